#include "pcm_internal.h"

pcm_status pcm_mpi_conv2d_forward(int comm_f, int placement, int strategy, int64_t grid_batch,
                                  int64_t grid_channels, int64_t active_ranks, int dtype,
                                  const pcm_conv_desc *desc, const pcm_exec *exec,
                                  const void *input, const void *weight, const void *bias,
                                  void *output)
{
    (void)comm_f; (void)placement; (void)strategy; (void)grid_batch; (void)grid_channels;
    (void)active_ranks; (void)dtype; (void)desc; (void)exec; (void)input; (void)weight;
    (void)bias; (void)output;
    return PCM_ERR_UNSUPPORTED;
}

pcm_status pcm_mpi_conv2d_backward(int comm_f, int placement, int strategy, int64_t grid_batch,
                                   int64_t grid_channels, int64_t active_ranks, int dtype,
                                   int need, const pcm_conv_desc *desc, const pcm_exec *exec,
                                   const void *grad_output, const void *input,
                                   const void *weight, void *grad_input, void *grad_weight,
                                   void *grad_bias)
{
    (void)comm_f; (void)placement; (void)strategy; (void)grid_batch; (void)grid_channels;
    (void)active_ranks; (void)dtype; (void)need; (void)desc; (void)exec; (void)grad_output;
    (void)input; (void)weight; (void)grad_input; (void)grad_weight; (void)grad_bias;
    return PCM_ERR_UNSUPPORTED;
}
