/* Direct convolution kernels for float32 and float64 (see conv2d_direct.inc). */
#include <omp.h>
#include <stdlib.h>

#include "pcm_internal.h"

#define T float
#define SUFFIX f32
#include "conv2d_direct.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "conv2d_direct.inc"
#undef T
#undef SUFFIX
