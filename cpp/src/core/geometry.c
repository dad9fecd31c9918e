/* Geometry checks and helpers shared by every kernel. */
#include <omp.h>

#include "pcm_internal.h"

/* Largest element count accepted for one array, so that products of sizes cannot overflow. */
#define PCM_MAX_ELEMENTS ((int64_t)1 << 56)

static int product_fits(int64_t a, int64_t b, int64_t c, int64_t d)
{
    __int128 p = (__int128)a * b * c * d;
    return p <= PCM_MAX_ELEMENTS;
}

pcm_status pcm_desc_check(const pcm_conv_desc *d)
{
    if (d == NULL)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->n < 0 || d->c < 0 || d->h < 0 || d->w < 0 || d->k < 0 || d->r < 1 || d->s < 1)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->out_h < 0 || d->out_w < 0 || d->stride_h < 1 || d->stride_w < 1)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->dilation_h < 1 || d->dilation_w < 1 || d->groups < 1)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->pad_bottom < 0 || d->pad_right < 0)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->c % d->groups != 0 || d->k % d->groups != 0)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->r > PCM_MAX_ELEMENTS / d->dilation_h || d->s > PCM_MAX_ELEMENTS / d->dilation_w)
        return PCM_ERR_INVALID_ARGUMENT;
    if (!product_fits(d->n, d->c, d->h, d->w) || !product_fits(d->n, d->k, d->out_h, d->out_w) ||
        !product_fits(d->k, d->c / d->groups, d->r, d->s))
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->pad_top > PCM_MAX_ELEMENTS || d->pad_top < -PCM_MAX_ELEMENTS ||
        d->pad_left > PCM_MAX_ELEMENTS || d->pad_left < -PCM_MAX_ELEMENTS)
        return PCM_ERR_INVALID_ARGUMENT;
    if (d->out_h > PCM_MAX_ELEMENTS / d->stride_h || d->out_w > PCM_MAX_ELEMENTS / d->stride_w)
        return PCM_ERR_INVALID_ARGUMENT;
    return PCM_OK;
}

int64_t pcm_input_elements(const pcm_conv_desc *d) { return d->n * d->c * d->h * d->w; }

int64_t pcm_weight_elements(const pcm_conv_desc *d)
{
    return d->k * (d->c / d->groups) * d->r * d->s;
}

int64_t pcm_output_elements(const pcm_conv_desc *d) { return d->n * d->k * d->out_h * d->out_w; }

int pcm_threads(const pcm_exec *exec)
{
    if (exec != NULL && exec->threads > 0)
        return exec->threads > 4096 ? 4096 : (int)exec->threads;
    return omp_get_max_threads();
}

void pcm_valid_range(int64_t size, int64_t out_size, int64_t stride, int64_t pad,
                     int64_t tap_offset, int64_t *lo, int64_t *hi)
{
    /* Input index x * stride + (tap_offset - pad) must lie in [0, size). */
    int64_t shift = tap_offset - pad;
    int64_t first = -pcm_floor_div(shift, stride); /* ceil(-shift / stride) */
    int64_t last = pcm_floor_div(size - 1 - shift, stride) + 1;

    first = pcm_max64(first, 0);
    last = pcm_min64(last, out_size);
    *lo = first;
    *hi = last > first ? last : first;
}
