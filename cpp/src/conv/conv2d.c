/* Public local entry points: validate, choose an algorithm, run its kernel. */
#include <stddef.h>

#include "pcm_internal.h"
#include "conv/conv_depthwise.h"
#include "conv/conv_fast.h"
#include "conv/conv_fewchan.h"
#include "conv/conv_winograd.h"

typedef struct kernel_set {
    pcm_forward_fn forward[2];               /* indexed by pcm_dtype */
    pcm_backward_data_fn backward_data[2];
    pcm_backward_weight_fn backward_weight[2];
} kernel_set;

static const kernel_set reference_kernels = {
    {pcm_ref_forward_f32, pcm_ref_forward_f64},
    {pcm_ref_backward_data_f32, pcm_ref_backward_data_f64},
    {pcm_ref_backward_weight_f32, pcm_ref_backward_weight_f64},
};

/* The few-channel kernels where they fit (conv_fewchan.h), else register-tiled when the
 * horizontal stride is 1, else the generic row kernel. Backward data of stride-1 layers runs
 * the forward kernel on flipped weights, and backward weight has a plane kernel for depthwise
 * 3x3 layers (the generic row kernel otherwise). */
static const kernel_set direct_kernels = {
    {pcm_fewchan_forward_f32, pcm_fewchan_forward_f64},
    {pcm_fewchan_backward_data_f32, pcm_fewchan_backward_data_f64},
    {pcm_fewchan_backward_weight_f32, pcm_fewchan_backward_weight_f64},
};

static const kernel_set gemm_kernels = {
    {pcm_gemm_forward_f32, pcm_gemm_forward_f64},
    {pcm_gemm_backward_data_f32, pcm_gemm_backward_data_f64},
    {pcm_gemm_backward_weight_f32, pcm_gemm_backward_weight_f64},
};

/* Winograd F(2x2, 3x3): forward and backward data of 3x3 stride-1 layers only
 * (pcm_winograd_fits); it has no weight gradient. */
static const kernel_set winograd_kernels = {
    {pcm_winograd_forward_f32, pcm_winograd_forward_f64},
    {pcm_winograd_backward_data_f32, pcm_winograd_backward_data_f64},
    {pcm_winograd_backward_weight_f32, pcm_winograd_backward_weight_f64},
};

static const kernel_set *kernels_for(int64_t algorithm)
{
    switch (algorithm) {
    case PCM_ALGO_DIRECT: return &direct_kernels;
    case PCM_ALGO_GEMM: return &gemm_kernels;
    case PCM_ALGO_WINOGRAD: return &winograd_kernels;
    case PCM_ALGO_REFERENCE: return &reference_kernels;
    default: return NULL;
    }
}

int pcm_algorithm_supported(int64_t algorithm, int op, const pcm_conv_desc *desc)
{
    if (op < PCM_OP_FORWARD || op > PCM_OP_BACKWARD_WEIGHT || pcm_desc_check(desc) != PCM_OK)
        return 0;
    if (algorithm == PCM_ALGO_AUTO)
        return 1;
    if (algorithm == PCM_ALGO_WINOGRAD)
        return pcm_winograd_fits(op, desc);
    return kernels_for(algorithm) != NULL;
}

/* The algorithm a call runs: the requested one, or the heuristic's choice for AUTO. */
/* Backward data with few input channels per group, on short rows: the flipped convolution
 * has only cg output channels, which leave most of a GEMM register tile idle, while the
 * direct kernel reads the kg output-gradient rows in place. Measured on one AVX-512 core in
 * float32 and float64, direct took 0.25-0.5x GEMM's time when kg * out_w stayed within 4096
 * (1024 for one channel) and about the same or more above that, where the rows leave L1. */
static int few_gradient_channels(const pcm_conv_desc *d, int64_t cg, int64_t kg)
{
    const int64_t row_limit = cg >= 2 ? 4096 : 1024;
    return cg <= 16 && d->dilation_w == 1 && kg * d->out_w <= row_limit;
}

static int64_t choose_algorithm(const pcm_exec *exec, int op, const pcm_conv_desc *d)
{
    const int64_t cg = d->c / d->groups, kg = d->k / d->groups;
    const int unit_stride = d->stride_h == 1 && d->stride_w == 1;

    if (exec != NULL && exec->algorithm != PCM_ALGO_AUTO)
        return exec->algorithm;
    /* Few input channels per group (image filters, first layers, depthwise): the direct
     * kernel reads rows in place, where im2col would copy r * s times more data than the
     * multiply-adds use. Backward data of a stride-1 layer is a forward convolution with kg
     * input channels per group. Everything else runs on the GEMM tiles. */
    switch (op) {
    case PCM_OP_FORWARD:
        return ((cg <= 4 && pcm_simd_direct_fits(d)) || pcm_dw3x3_fits(d)) ? PCM_ALGO_DIRECT
                                                                           : PCM_ALGO_GEMM;
    case PCM_OP_BACKWARD_DATA:
        return ((unit_stride && d->s <= PCM_DIRECT_S_MAX &&
                 (kg <= 4 || few_gradient_channels(d, cg, kg))) ||
                pcm_dw3x3_backward_data_fits(d)) ? PCM_ALGO_DIRECT : PCM_ALGO_GEMM;
    default:
        /* Depthwise 3x3: the direct plane kernels sum in place, where im2col would copy
         * every 14-wide row segment nine times. Few channels: the few-channel kernel sums
         * shifted input rows in place, where im2col would copy each input element r * s
         * times. */
        return ((d->c == d->groups && d->k == d->groups && d->r == 3 && d->s == 3 &&
                 d->stride_w == 1) || pcm_dw3x3_backward_weight_fits(d) ||
                pcm_fewchan_weight_fits(d)) ? PCM_ALGO_DIRECT : PCM_ALGO_GEMM;
    }
}

static int exec_valid(const pcm_exec *exec)
{
    return exec != NULL && exec->algorithm >= PCM_ALGO_AUTO &&
           exec->algorithm <= PCM_ALGO_REFERENCE && exec->threads >= 0 && exec->block_k >= 0 &&
           exec->block_c >= 0 && exec->block_w >= 0;
}

pcm_status pcm_choose_algorithm(int op, const pcm_conv_desc *desc, const pcm_exec *exec,
                                int64_t *algorithm_out)
{
    pcm_status status = pcm_desc_check(desc);
    if (status != PCM_OK)
        return status;
    if (op < PCM_OP_FORWARD || op > PCM_OP_BACKWARD_WEIGHT || !exec_valid(exec) ||
        algorithm_out == NULL)
        return PCM_ERR_INVALID_ARGUMENT;

    int64_t algorithm = choose_algorithm(exec, op, desc);
    if (!pcm_algorithm_supported(algorithm, op, desc) || kernels_for(algorithm) == NULL)
        return PCM_ERR_UNSUPPORTED;
    *algorithm_out = algorithm;
    return PCM_OK;
}

/* Common checks of every entry point; fills *kernels_out on success. */
static pcm_status prepare(int dtype, const pcm_conv_desc *d, const pcm_exec *exec, int op,
                          const kernel_set **kernels_out)
{
    int64_t algorithm = PCM_ALGO_AUTO;
    if (dtype != PCM_FLOAT32 && dtype != PCM_FLOAT64)
        return PCM_ERR_INVALID_ARGUMENT;
    pcm_status status = pcm_choose_algorithm(op, d, exec, &algorithm);
    if (status != PCM_OK)
        return status;
    *kernels_out = kernels_for(algorithm);
    return PCM_OK;
}

pcm_status pcm_conv2d_forward(int dtype, const pcm_conv_desc *desc, const pcm_exec *exec,
                              const void *input, const void *weight, const void *bias,
                              void *output)
{
    const kernel_set *kernels = NULL;
    pcm_status status = prepare(dtype, desc, exec, PCM_OP_FORWARD, &kernels);
    if (status != PCM_OK)
        return status;
    if (input == NULL || weight == NULL || output == NULL)
        return PCM_ERR_INVALID_ARGUMENT;
    return kernels->forward[dtype](desc, exec, input, weight, bias, output);
}

pcm_status pcm_conv2d_backward_data(int dtype, const pcm_conv_desc *desc, const pcm_exec *exec,
                                    const void *grad_output, const void *weight, void *grad_input)
{
    const kernel_set *kernels = NULL;
    pcm_status status = prepare(dtype, desc, exec, PCM_OP_BACKWARD_DATA, &kernels);
    if (status != PCM_OK)
        return status;
    if (grad_output == NULL || weight == NULL || grad_input == NULL)
        return PCM_ERR_INVALID_ARGUMENT;
    return kernels->backward_data[dtype](desc, exec, grad_output, weight, grad_input);
}

pcm_status pcm_conv2d_backward_weight(int dtype, const pcm_conv_desc *desc, const pcm_exec *exec,
                                      const void *grad_output, const void *input,
                                      void *grad_weight, void *grad_bias)
{
    const kernel_set *kernels = NULL;
    pcm_status status = prepare(dtype, desc, exec, PCM_OP_BACKWARD_WEIGHT, &kernels);
    if (status != PCM_OK)
        return status;
    if (grad_output == NULL || input == NULL || (grad_weight == NULL && grad_bias == NULL))
        return PCM_ERR_INVALID_ARGUMENT;
    return kernels->backward_weight[dtype](desc, exec, grad_output, input, grad_weight,
                                           grad_bias);
}
