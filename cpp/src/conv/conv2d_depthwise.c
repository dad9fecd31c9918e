/* Depthwise 3x3 kernels (one input and one output channel per group) for float32 and
 * float64: forward, input gradient and weight gradient, with the OpenMP drivers that run them
 * over the (image, channel) planes. The AVX-512 code is compiled with a target attribute and
 * runs only when pcm_simd() reports AVX-512; other CPUs keep the plane and generic kernels of
 * conv2d_fast.inc and conv2d_direct.inc. */
#include <omp.h>
#include <stdlib.h>

#include "conv/conv_depthwise.h"
#include "conv/conv_fast.h"

/* Output rows computed together, one accumulator each. */
#define DW_ROWS 8

/* Maximum number of vectors of outputs whose products a weight-gradient lane sums in the
 * working precision before the lane sums are added to float64 totals. */
#define DW_FLUSH_OUTPUTS 512

/* Vectors per row of the widest rows the narrow-row kernels take. */
#define NARROW_MAX_VECTORS 2

/* Kernels of the weight gradient. */
#define DW_WEIGHT_STRIDE2 0
#define DW_WEIGHT_FLAT 1
#define DW_WEIGHT_NARROW 2

/* Channels of one weight-gradient task. */
#define DW_CHANNEL_BLOCK 32

/* Software prefetch of the cache line DW_PREFETCH_BYTES ahead of p, in a stream that a kernel
 * reads in order. The hardware prefetchers did not keep up with the weight gradient's two
 * input streams: with this prefetch, a 8x128x56x56 float32 weight gradient took 0.69 ms
 * instead of 1.7 ms (one thread, AMD EPYC Zen 4). */
#define DW_PREFETCH_BYTES 1024
#define DW_PREFETCH(p) _mm_prefetch((const char *)(p) + DW_PREFETCH_BYTES, _MM_HINT_T0)
#define DW_PREFETCH_AT(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define DW_PREFETCH_WRITE(p) __builtin_prefetch((const char *)(p) + DW_PREFETCH_BYTES, 1, 3)
#define DW_PREFETCH_WRITE_AT(p) __builtin_prefetch((const char *)(p), 1, 3)

/* Flat layout of one call, for stride 1 with output rows as wide as input rows. An output
 * plane is nvec vectors of consecutive output elements, and tap t = 3 * i + j of output
 * element o reads input element o + off[t]. masks[v * 9 + t] enables the lanes of vector v
 * whose output lies in the plane and whose tap t lies in the image. In the vectors
 * [mid0, mid1), every kernel row lies in the image for every lane, so masks[v * 9 + t] equals
 * masks[v * 9 + t % 3] there. Plain loads of every tap of those vectors also stay inside the
 * input plane. tail enables the lanes of the last vector that lie in the plane. */
typedef struct dw_flat {
    uint16_t *masks;
    int64_t off[9];
    int64_t nvec, mid0, mid1;
    int64_t dilation_w;
    int center_full; /* column tap 1 lies in the image for every output (pad_left == dilation_w) */
    uint16_t tail;
} dw_flat;

/* narrow_fits and flat_plan serve the AVX-512 drivers only; builds without those drivers
 * leave them unused. */
static int flat_fits(const pcm_conv_desc *d);
__attribute__((unused)) static int narrow_fits(const pcm_conv_desc *d, int vl);
static int stride2_fits(const pcm_conv_desc *d);
__attribute__((unused)) static int flat_plan(const pcm_conv_desc *d, int vl, dw_flat *f);

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define HAVE_DW_AVX512 1
#define ISA_TARGET __attribute__((target("avx512f,avx512dq,fma")))

ISA_TARGET static inline __mmask16 dw_mask16(int64_t lo, int64_t hi)
{
    lo = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
    hi = hi < 0 ? 0 : (hi > 16 ? 16 : hi);
    if (hi <= lo)
        return 0;
    return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

/* Returns the sum of the lanes, added in float64. */
ISA_TARGET static inline double dw_reduce_ps(__m512 v)
{
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

#define T float
#define SUFFIX f32
#define VL 16
#define VEC __m512
#define MASK __mmask16
#define IVEC __m512i
#define V_SET1(x) _mm512_set1_ps(x)
#define V_ZERO() _mm512_setzero_ps()
#define V_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define V_LOADU(p) _mm512_loadu_ps(p)
#define V_STOREU(p, v) _mm512_storeu_ps((p), (v))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm512_add_ps((a), (b))
#define V_MUL(a, b) _mm512_mul_ps((a), (b))
#define V_MASKZ_ALIGNR(m, hi, lo, n)                                                           \
    _mm512_castsi512_ps(                                                                       \
        _mm512_maskz_alignr_epi32((m), _mm512_castps_si512(hi), _mm512_castps_si512(lo), (n)))
#define V_ALIGNR(hi, lo, n)                                                                    \
    _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), (n)))
#define V_MASK_ADD(src, m, a, b) _mm512_mask_add_ps((src), (m), (a), (b))
#define V_MASK_FMA(a, b, c, m) _mm512_mask3_fmadd_ps((a), (b), (c), (m))
#define V_MASKZ(m, v) _mm512_maskz_mov_ps((m), (v))
#define V_REDUCE(v) dw_reduce_ps(v)
#define V_MASK(lo, hi) dw_mask16((lo), (hi))
#define V_PERM2(a, idx, b) _mm512_permutex2var_ps((a), (idx), (b))
#define V_EVEN_INDEX() _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define V_ODD_INDEX() _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
#define V_INTERLEAVE_LO() _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define V_INTERLEAVE_HI() _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#include "conv2d_depthwise.inc"
#include "depthwise_planes.inc"
#include "depthwise_drivers.inc"
#undef T
#undef SUFFIX
#undef VL
#undef VEC
#undef MASK
#undef IVEC
#undef V_SET1
#undef V_ZERO
#undef V_MLOAD
#undef V_LOADU
#undef V_STOREU
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_MUL
#undef V_ALIGNR
#undef V_MASKZ_ALIGNR
#undef V_MASK_ADD
#undef V_MASK_FMA
#undef V_MASKZ
#undef V_REDUCE
#undef V_MASK
#undef V_PERM2
#undef V_EVEN_INDEX
#undef V_ODD_INDEX
#undef V_INTERLEAVE_LO
#undef V_INTERLEAVE_HI

#define T double
#define SUFFIX f64
#define VL 8
#define VEC __m512d
#define MASK __mmask8
#define IVEC __m512i
#define V_SET1(x) _mm512_set1_pd(x)
#define V_ZERO() _mm512_setzero_pd()
#define V_MLOAD(p, m) _mm512_maskz_loadu_pd((m), (p))
#define V_LOADU(p) _mm512_loadu_pd(p)
#define V_STOREU(p, v) _mm512_storeu_pd((p), (v))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define V_ADD(a, b) _mm512_add_pd((a), (b))
#define V_MUL(a, b) _mm512_mul_pd((a), (b))
#define V_MASKZ_ALIGNR(m, hi, lo, n)                                                           \
    _mm512_castsi512_pd(                                                                       \
        _mm512_maskz_alignr_epi64((m), _mm512_castpd_si512(hi), _mm512_castpd_si512(lo), (n)))
#define V_ALIGNR(hi, lo, n)                                                                    \
    _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(hi), _mm512_castpd_si512(lo), (n)))
#define V_MASK_ADD(src, m, a, b) _mm512_mask_add_pd((src), (m), (a), (b))
#define V_MASK_FMA(a, b, c, m) _mm512_mask3_fmadd_pd((a), (b), (c), (m))
#define V_MASKZ(m, v) _mm512_maskz_mov_pd((m), (v))
#define V_REDUCE(v) _mm512_reduce_add_pd(v)
#define V_MASK(lo, hi) ((__mmask8)dw_mask16((lo) < 8 ? (lo) : 8, (hi) < 8 ? (hi) : 8))
#define V_PERM2(a, idx, b) _mm512_permutex2var_pd((a), (idx), (b))
#define V_EVEN_INDEX() _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)
#define V_ODD_INDEX() _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15)
#define V_INTERLEAVE_LO() _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11)
#define V_INTERLEAVE_HI() _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15)
#include "conv2d_depthwise.inc"
#include "depthwise_planes.inc"
#include "depthwise_drivers.inc"
#undef T
#undef SUFFIX
#undef VL
#undef VEC
#undef MASK
#undef IVEC
#undef V_SET1
#undef V_ZERO
#undef V_MLOAD
#undef V_LOADU
#undef V_STOREU
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_MUL
#undef V_ALIGNR
#undef V_MASKZ_ALIGNR
#undef V_MASK_ADD
#undef V_MASK_FMA
#undef V_MASKZ
#undef V_REDUCE
#undef V_MASK
#undef V_PERM2
#undef V_EVEN_INDEX
#undef V_ODD_INDEX
#undef V_INTERLEAVE_LO
#undef V_INTERLEAVE_HI
#endif

/* One input and one output channel per group, a 3x3 kernel, on a CPU with AVX-512. */
static int depthwise_3x3(const pcm_conv_desc *d)
{
#ifdef HAVE_DW_AVX512
    return d->c == d->groups && d->k == d->groups && d->r == 3 && d->s == 3 &&
           pcm_simd() == PCM_SIMD_AVX512;
#else
    (void)d;
    return 0;
#endif
}

/* Whether the flat kernels (see dw_flat) compute this layer. The flat forward beat the row
 * kernel at every width measured, from 14 to 112 (at 56: 0.7 against 1.06 ms for
 * 8x128x56x56 float32, one thread). So stride 1 runs the row kernel only where the output
 * rows are narrower than the input rows. */
static int flat_fits(const pcm_conv_desc *d)
{
    return depthwise_3x3(d) && d->stride_h == 1 && d->stride_w == 1 && d->out_w == d->w;
}

/* Whether the narrow-row kernels (rows of at most two vectors of `vl` lanes, forward and
 * weight gradient) compute this layer: a flat layer with dilation 1 and pad_left 1. */
static int narrow_fits(const pcm_conv_desc *d, int vl)
{
    return flat_fits(d) && d->dilation_h == 1 && d->dilation_w == 1 && d->pad_left == 1 &&
           d->w <= NARROW_MAX_VECTORS * vl;
}

static int stride2_fits(const pcm_conv_desc *d)
{
    return depthwise_3x3(d) && d->stride_h == 2 && d->stride_w == 2 && d->dilation_h == 1 &&
           d->dilation_w == 1;
}

int pcm_dw3x3_fits(const pcm_conv_desc *d)
{
    return flat_fits(d) ||
           (depthwise_3x3(d) && d->dilation_h == 1 && d->dilation_w == 1 &&
            (d->stride_w == 1 || d->stride_w == 2) && (d->stride_h == 1 || d->stride_h == 2));
}

int pcm_dw3x3_backward_data_fits(const pcm_conv_desc *d) { return stride2_fits(d); }

int pcm_dw3x3_backward_weight_fits(const pcm_conv_desc *d)
{
    return flat_fits(d) || stride2_fits(d);
}

/* Build the mask table of a flat call (see dw_flat) for vectors of `vl` lanes. Returns 0 when
 * the table cannot be allocated. */
static int flat_plan(const pcm_conv_desc *d, int vl, dw_flat *f)
{
    const int64_t w = d->w, plane = d->out_h * d->out_w;
    f->nvec = (plane + vl - 1) / vl;
    f->dilation_w = d->dilation_w;
    f->center_full = d->pad_left == d->dilation_w;
    f->masks = malloc((size_t)pcm_max64(f->nvec * 9, 1) * sizeof(uint16_t));
    if (f->masks == NULL)
        return 0;
    for (int t = 0; t < 9; ++t)
        f->off[t] = ((t / 3) * d->dilation_h - d->pad_top) * w + (t % 3) * d->dilation_w -
                    d->pad_left;

    /* Each vector is cut into segments that lie in one output row. In a segment, the lanes
     * whose tap reads inside the image form one range. */
    f->mid0 = f->mid1 = f->nvec;
    for (int64_t v = 0; v < f->nvec; ++v) {
        uint16_t *m = f->masks + v * 9;
        const int64_t end = pcm_min64((v + 1) * vl, plane);
        int rows_full = 1;
        for (int t = 0; t < 9; ++t)
            m[t] = 0;
        for (int64_t o = v * vl; o < end;) {
            const int64_t y = o / w, x = o % w, len = pcm_min64(end, (y + 1) * w) - o;
            for (int64_t i = 0; i < 3; ++i) {
                const int64_t iy = y + i * d->dilation_h - d->pad_top;
                if (iy < 0 || iy >= d->h) {
                    rows_full = 0;
                    continue;
                }
                for (int64_t j = 0; j < 3; ++j) {
                    const int64_t shift = j * d->dilation_w - d->pad_left + x;
                    const int64_t lo = pcm_max64(0, -shift), hi = pcm_min64(len, w - shift);
                    if (lo < hi)
                        m[i * 3 + j] |= (uint16_t)((((1u << (hi - lo)) - 1u) << lo) << (o - v * vl));
                }
            }
            o += len;
        }
        /* The zone is the first run of vectors whose kernel rows all lie in the image and whose
         * plain loads (all lanes, all taps) stay inside the input plane. */
        if (v * vl + f->off[0] < 0 || (v + 1) * vl - 1 + f->off[8] >= d->h * w)
            rows_full = 0;
        if (rows_full && f->mid0 == f->nvec)
            f->mid0 = v;
        if (!rows_full && f->mid0 < f->nvec && f->mid1 == f->nvec)
            f->mid1 = v;
    }
    f->tail = (uint16_t)((1u << (plane - (f->nvec - 1) * vl)) - 1u);
    return 1;
}

#define EXPORT_DRIVERS(T, SUFFIX)                                                              \
    pcm_status pcm_dw3x3_forward_##SUFFIX(const pcm_conv_desc *d, const pcm_exec *e,          \
                                          const T *input, const T *weight, const T *bias,     \
                                          T *output)                                          \
    {                                                                                          \
        IF_AVX512(return forward_driver_##SUFFIX(d, e, input, weight, bias, output));          \
        return PCM_ERR_UNSUPPORTED;                                                            \
    }                                                                                          \
    pcm_status pcm_dw3x3_backward_data_##SUFFIX(const pcm_conv_desc *d, const pcm_exec *e,    \
                                                const T *grad_output, const T *weight,        \
                                                T *grad_input)                                 \
    {                                                                                          \
        IF_AVX512(return data_driver_##SUFFIX(d, e, grad_output, weight, grad_input));         \
        return PCM_ERR_UNSUPPORTED;                                                            \
    }                                                                                          \
    pcm_status pcm_dw3x3_backward_weight_##SUFFIX(const pcm_conv_desc *d, const pcm_exec *e,  \
                                                  const T *grad_output, const T *input,       \
                                                  T *grad_weight)                              \
    {                                                                                          \
        IF_AVX512(return weight_driver_##SUFFIX(d, e, grad_output, input, grad_weight));       \
        return PCM_ERR_UNSUPPORTED;                                                            \
    }

#ifdef HAVE_DW_AVX512
#define IF_AVX512(statement) statement
#else
#define IF_AVX512(statement)
#endif
EXPORT_DRIVERS(float, f32)
EXPORT_DRIVERS(double, f64)
