/* Private declarations of the few-channel kernels in conv2d_fewchan.c: layers with at most
 * FC_C_MAX input channels and few output channels per group and horizontal stride 1, such as
 * image filters and the first layer of a network. */
#ifndef PYCONVMPI_CONV_FEWCHAN_H
#define PYCONVMPI_CONV_FEWCHAN_H

#include "pcm_internal.h"

/* Channels per group up to which the few-channel kernels run: input channels, and output
 * channels of the forward and of the weight-gradient kernel. */
#define FC_C_MAX 4
#define FC_K_MAX_FORWARD 8
#define FC_K_MAX_WEIGHT 16

/* The DIRECT algorithm's entry points. Each runs the few-channel kernel where
 * pcm_fewchan_forward_fits or pcm_fewchan_weight_fits accepts the geometry, and the
 * register-tiled direct kernels of conv2d_fast.c otherwise. Backward data of stride-1 layers
 * is the forward kernel on flipped weights. */
PCM_DECLARE_KERNELS(fewchan, f32)
PCM_DECLARE_KERNELS(fewchan, f64)

/* Whether the few-channel forward kernel computes this layer. It needs horizontal stride 1, at
 * most FC_C_MAX input and FC_K_MAX_FORWARD output channels per group, and a staging buffer of
 * bounded size. Depthwise layers (one input and one output channel per group) are left to the
 * depthwise and plane kernels. */
PCM_INTERNAL int pcm_fewchan_forward_fits(int dtype, const pcm_conv_desc *d);

/* Whether the few-channel weight-gradient kernel computes this layer: the same rules with
 * FC_K_MAX_WEIGHT output channels per group. */
PCM_INTERNAL int pcm_fewchan_weight_fits(const pcm_conv_desc *d);

#endif /* PYCONVMPI_CONV_FEWCHAN_H */
