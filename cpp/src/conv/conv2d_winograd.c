/* Winograd F(2x2, 3x3) convolution kernels for float32 and float64 (conv2d_winograd.inc). */
#include <omp.h>
#include <stdlib.h>

#include "conv/conv_fast.h"
#include "conv/conv_winograd.h"

int pcm_winograd_fits(int op, const pcm_conv_desc *d)
{
    return (op == PCM_OP_FORWARD || op == PCM_OP_BACKWARD_DATA) && d->r == 3 && d->s == 3 &&
           d->stride_h == 1 && d->stride_w == 1 && d->dilation_h == 1 && d->dilation_w == 1;
}

#define T float
#define SUFFIX f32
#include "conv2d_winograd.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "conv2d_winograd.inc"
#undef T
#undef SUFFIX
