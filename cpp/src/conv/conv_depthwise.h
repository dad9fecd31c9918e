/* Private declarations of the depthwise 3x3 kernels in conv2d_depthwise.c. */
#ifndef PYCONVMPI_CONV_DEPTHWISE_H
#define PYCONVMPI_CONV_DEPTHWISE_H

#include <stdint.h>

#include "pcm_internal.h"

/* Whether pcm_dw3x3_forward_* computes this layer. It needs one input and one output channel
 * per group, a 3x3 kernel and a CPU with AVX-512. Then it takes strides 1 and 2 without
 * dilation, and stride 1 at any dilation when output rows are as wide as input rows. The
 * input gradient of a stride-1 layer runs as such a forward (pcm_backward_data_flipped_*). */
PCM_INTERNAL int pcm_dw3x3_fits(const pcm_conv_desc *d);

/* Whether pcm_dw3x3_backward_data_* computes this layer: as above, strides 2 and 2, no
 * dilation, any padding. */
PCM_INTERNAL int pcm_dw3x3_backward_data_fits(const pcm_conv_desc *d);

/* Whether pcm_dw3x3_backward_weight_* computes this layer: stride 1 with output rows as wide
 * as the input rows (any dilation), or strides 2 and 2 without dilation. */
PCM_INTERNAL int pcm_dw3x3_backward_weight_fits(const pcm_conv_desc *d);

/* Callers run these only on layers that the matching fits function accepts. Builds without
 * the AVX-512 code return PCM_ERR_UNSUPPORTED. */
PCM_INTERNAL pcm_status pcm_dw3x3_forward_f32(const pcm_conv_desc *d, const pcm_exec *e,
                                              const float *input, const float *weight,
                                              const float *bias, float *output);
PCM_INTERNAL pcm_status pcm_dw3x3_forward_f64(const pcm_conv_desc *d, const pcm_exec *e,
                                              const double *input, const double *weight,
                                              const double *bias, double *output);
PCM_INTERNAL pcm_status pcm_dw3x3_backward_data_f32(const pcm_conv_desc *d, const pcm_exec *e,
                                                    const float *grad_output,
                                                    const float *weight, float *grad_input);
PCM_INTERNAL pcm_status pcm_dw3x3_backward_data_f64(const pcm_conv_desc *d, const pcm_exec *e,
                                                    const double *grad_output,
                                                    const double *weight, double *grad_input);
/* Per lane, the products of at most 512 output vectors are summed in the working precision,
 * and those sums are added in float64. The bias gradient is left to the caller. */
PCM_INTERNAL pcm_status pcm_dw3x3_backward_weight_f32(const pcm_conv_desc *d, const pcm_exec *e,
                                                      const float *grad_output,
                                                      const float *input, float *grad_weight);
PCM_INTERNAL pcm_status pcm_dw3x3_backward_weight_f64(const pcm_conv_desc *d, const pcm_exec *e,
                                                      const double *grad_output,
                                                      const double *input, double *grad_weight);

#endif /* PYCONVMPI_CONV_DEPTHWISE_H */
