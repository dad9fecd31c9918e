/* Private declarations of the depthwise 3x3 plane kernels in conv2d_depthwise.c. */
#ifndef PYCONVMPI_CONV_DEPTHWISE_H
#define PYCONVMPI_CONV_DEPTHWISE_H

#include <stdint.h>

#include "pcm_internal.h"

/* Whether the depthwise 3x3 kernel computes this layer: one input and one output channel per group,
 * a 3x3 kernel without dilation, strides 1 or 2, on a CPU with AVX-512. */
PCM_INTERNAL int pcm_dw3x3_fits(const pcm_conv_desc *d);

/* Output rows [y0, y1) of one output plane: out[y][x] = bias + sum over (i, j)
 * of wt[i][j] * in[y * stride_h - pad_top + i][x * stride_w - pad_left + j], with input rows
 * and columns outside the image reading as zero. `in` is the plane's input channel, `out` the
 * whole output plane. */
PCM_INTERNAL void pcm_dw3x3_rows_f32(const pcm_conv_desc *d, const float *in, const float *wt,
                                     float bias, float *out, int64_t y0, int64_t y1);
PCM_INTERNAL void pcm_dw3x3_rows_f64(const pcm_conv_desc *d, const double *in, const double *wt,
                                     double bias, double *out, int64_t y0, int64_t y1);

#endif /* PYCONVMPI_CONV_DEPTHWISE_H */
