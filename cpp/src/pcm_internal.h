/* Private declarations shared between the library's source files; never installed. */
#ifndef PYCONVMPI_PCM_INTERNAL_H
#define PYCONVMPI_PCM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "pyconvmpi/pcm.h"

#define PCM_INTERNAL __attribute__((visibility("hidden")))

enum { PCM_SIMD_SCALAR = 0, PCM_SIMD_AVX2 = 1, PCM_SIMD_AVX512 = 2 };

enum { PCM_OP_FORWARD = 0, PCM_OP_BACKWARD_DATA = 1, PCM_OP_BACKWARD_WEIGHT = 2 };

/* Detected SIMD level (PCM_SIMD_*), computed on first use. */
PCM_INTERNAL int pcm_simd(void);

/* Check a geometry against the rules in pcm.h; PCM_OK or PCM_ERR_INVALID_ARGUMENT. */
PCM_INTERNAL pcm_status pcm_desc_check(const pcm_conv_desc *d);

/* Element count of each array of a geometry. */
PCM_INTERNAL int64_t pcm_input_elements(const pcm_conv_desc *d);
PCM_INTERNAL int64_t pcm_weight_elements(const pcm_conv_desc *d);
PCM_INTERNAL int64_t pcm_output_elements(const pcm_conv_desc *d);

/* Threads for a call: exec->threads if positive, else the OpenMP default. */
PCM_INTERNAL int pcm_threads(const pcm_exec *exec);

/* Output columns [*lo, *hi) whose input column x * stride - pad + tap * dilation lies in
 * [0, size). Empty ranges come back as lo == hi. */
PCM_INTERNAL void pcm_valid_range(int64_t size, int64_t out_size, int64_t stride, int64_t pad,
                                  int64_t tap_offset, int64_t *lo, int64_t *hi);

static inline int64_t pcm_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t pcm_max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Floor division for any sign of a and b > 0. */
static inline int64_t pcm_floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* Kernel signatures; every algorithm implements all three operations for both dtypes or
 * reports through pcm_algorithm_supported that it does not. Geometry is already checked. */
typedef pcm_status (*pcm_forward_fn)(const pcm_conv_desc *d, const pcm_exec *e, const void *input,
                                     const void *weight, const void *bias, void *output);
typedef pcm_status (*pcm_backward_data_fn)(const pcm_conv_desc *d, const pcm_exec *e,
                                           const void *grad_output, const void *weight,
                                           void *grad_input);
typedef pcm_status (*pcm_backward_weight_fn)(const pcm_conv_desc *d, const pcm_exec *e,
                                             const void *grad_output, const void *input,
                                             void *grad_weight, void *grad_bias);

#define PCM_DECLARE_KERNELS(algo, suffix)                                                     \
    PCM_INTERNAL pcm_status pcm_##algo##_forward_##suffix(                                    \
        const pcm_conv_desc *d, const pcm_exec *e, const void *input, const void *weight,     \
        const void *bias, void *output);                                                      \
    PCM_INTERNAL pcm_status pcm_##algo##_backward_data_##suffix(                              \
        const pcm_conv_desc *d, const pcm_exec *e, const void *grad_output,                   \
        const void *weight, void *grad_input);                                                \
    PCM_INTERNAL pcm_status pcm_##algo##_backward_weight_##suffix(                            \
        const pcm_conv_desc *d, const pcm_exec *e, const void *grad_output,                   \
        const void *input, void *grad_weight, void *grad_bias);

PCM_DECLARE_KERNELS(ref, f32)
PCM_DECLARE_KERNELS(ref, f64)
PCM_DECLARE_KERNELS(direct, f32)
PCM_DECLARE_KERNELS(direct, f64)

/* Flush denormals to zero for the duration of a kernel and restore the caller's state. */
typedef struct pcm_fp_state { unsigned int mxcsr; } pcm_fp_state;
PCM_INTERNAL void pcm_fp_enter(pcm_fp_state *saved);
PCM_INTERNAL void pcm_fp_leave(const pcm_fp_state *saved);

#endif /* PYCONVMPI_PCM_INTERNAL_H */
