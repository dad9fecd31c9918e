/* Private declarations of the fast convolution drivers in conv2d_fast.c: GEMM over im2col
 * tiles and the register-tiled direct kernel. */
#ifndef PYCONVMPI_CONV_FAST_H
#define PYCONVMPI_CONV_FAST_H

#include <stddef.h>

#include "pcm_internal.h"
#include "conv/kernels/tiles.h"

PCM_DECLARE_KERNELS(gemm, f32)
PCM_DECLARE_KERNELS(gemm, f64)
PCM_DECLARE_KERNELS(simd_direct, f32)
PCM_DECLARE_KERNELS(simd_direct, f64)

/* Whether the register-tiled direct kernel handles this geometry; otherwise the DIRECT
 * algorithm runs the generic row kernel of conv2d_direct.inc. */
PCM_INTERNAL int pcm_simd_direct_fits(const pcm_conv_desc *d);

/* The register tile a driver uses for `rows` output rows (channels) and `cols` columns, with
 * exec->block_k and exec->block_w as upper bounds when they are positive. */
PCM_INTERNAL const pcm_tile *pcm_choose_tile(const pcm_tile_set *set, int64_t rows, int64_t cols,
                                             const pcm_exec *e);
PCM_INTERNAL const pcm_dot_tile *pcm_choose_dot(const pcm_tile_set *set, int64_t rows,
                                                const pcm_exec *e);

/* Threads for a call: pcm_threads(e), but at most one per 2^18 multiply-adds, so that tiny
 * convolutions do not pay for waking threads. exec->threads is therefore an upper bound. */
PCM_INTERNAL int pcm_work_threads(const pcm_conv_desc *d, const pcm_exec *e);

/* Backward data of a stride-1 layer as a forward convolution, run by `forward`, of grad_output
 * with the weights flipped in both spatial axes and transposed per group. */
PCM_INTERNAL pcm_status pcm_backward_data_flipped_f32(const pcm_conv_desc *d, const pcm_exec *e,
                                                      const float *grad_output,
                                                      const float *weight, float *grad_input,
                                                      pcm_forward_fn forward);
PCM_INTERNAL pcm_status pcm_backward_data_flipped_f64(const pcm_conv_desc *d, const pcm_exec *e,
                                                      const double *grad_output,
                                                      const double *weight, double *grad_input,
                                                      pcm_forward_fn forward);

/* 64-byte aligned allocation of `bytes` (rounded up); free with free(). */
PCM_INTERNAL void *pcm_alloc64(size_t bytes);

#endif /* PYCONVMPI_CONV_FAST_H */
