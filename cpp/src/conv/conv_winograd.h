/* Private declarations of the Winograd F(2x2, 3x3) kernels in conv2d_winograd.c. */
#ifndef PYCONVMPI_CONV_WINOGRAD_H
#define PYCONVMPI_CONV_WINOGRAD_H

#include "pcm_internal.h"

PCM_DECLARE_KERNELS(winograd, f32)
PCM_DECLARE_KERNELS(winograd, f64)

/* Whether the Winograd kernels compute operation op of this geometry: forward and backward
 * data of 3x3 layers with stride 1 and dilation 1 (any groups and padding). */
PCM_INTERNAL int pcm_winograd_fits(int op, const pcm_conv_desc *d);

#endif /* PYCONVMPI_CONV_WINOGRAD_H */
