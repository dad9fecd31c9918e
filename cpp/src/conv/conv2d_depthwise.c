/* Depthwise 3x3 plane kernels (one input and one output channel per group, no dilation,
 * strides 1 or 2) for float32 and float64. The AVX-512 code is compiled with a
 * target attribute and runs only when pcm_simd() reports AVX-512; other CPUs keep the plane
 * and generic kernels of conv2d_fast.inc and conv2d_direct.inc. */
#include "conv/conv_depthwise.h"

/* Output rows computed together, one accumulator each. */
#define DW_ROWS 8

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

#define T float
#define SUFFIX f32
#define VL 16
#define VEC __m512
#define MASK __mmask16
#define IVEC __m512i
#define V_SET1(x) _mm512_set1_ps(x)
#define V_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define V_LOADU(p) _mm512_loadu_ps(p)
#define V_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_MASK(lo, hi) dw_mask16((lo), (hi))
#define V_PERM2(a, idx, b) _mm512_permutex2var_ps((a), (idx), (b))
#define V_EVEN_INDEX() _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define V_ODD_INDEX() _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
#include "conv2d_depthwise.inc"
#undef T
#undef SUFFIX
#undef VL
#undef VEC
#undef MASK
#undef IVEC
#undef V_SET1
#undef V_MLOAD
#undef V_LOADU
#undef V_MSTORE
#undef V_FMA
#undef V_MASK
#undef V_PERM2
#undef V_EVEN_INDEX
#undef V_ODD_INDEX

#define T double
#define SUFFIX f64
#define VL 8
#define VEC __m512d
#define MASK __mmask8
#define IVEC __m512i
#define V_SET1(x) _mm512_set1_pd(x)
#define V_MLOAD(p, m) _mm512_maskz_loadu_pd((m), (p))
#define V_LOADU(p) _mm512_loadu_pd(p)
#define V_MSTORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define V_MASK(lo, hi) ((__mmask8)dw_mask16((lo) < 8 ? (lo) : 8, (hi) < 8 ? (hi) : 8))
#define V_PERM2(a, idx, b) _mm512_permutex2var_pd((a), (idx), (b))
#define V_EVEN_INDEX() _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)
#define V_ODD_INDEX() _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15)
#include "conv2d_depthwise.inc"
#undef T
#undef SUFFIX
#undef VL
#undef VEC
#undef MASK
#undef IVEC
#undef V_SET1
#undef V_MLOAD
#undef V_LOADU
#undef V_MSTORE
#undef V_FMA
#undef V_MASK
#undef V_PERM2
#undef V_EVEN_INDEX
#undef V_ODD_INDEX
#endif

int pcm_dw3x3_fits(const pcm_conv_desc *d)
{
#ifdef HAVE_DW_AVX512
    return d->c == d->groups && d->k == d->groups && d->r == 3 && d->s == 3 &&
           d->dilation_h == 1 && d->dilation_w == 1 && (d->stride_w == 1 || d->stride_w == 2) &&
           (d->stride_h == 1 || d->stride_h == 2) &&
           pcm_simd() == PCM_SIMD_AVX512;
#else
    (void)d;
    return 0;
#endif
}

/* Scalar rows for CPUs without AVX-512. The drivers do not call them there (pcm_dw3x3_fits
 * returns 0, and the plane kernels are faster), but a call still computes the right rows. */
#define SCALAR_ROWS(T, SUFFIX)                                                                   \
    static void scalar_rows_##SUFFIX(const pcm_conv_desc *d, const T *in, const T *wt, T bias, \
                                     T *out, int64_t y0, int64_t y1)                            \
    {                                                                                            \
        for (int64_t y = y0; y < y1; ++y)                                                        \
            for (int64_t x = 0; x < d->out_w; ++x) {                                             \
                T sum = bias;                                                                    \
                for (int64_t i = 0; i < 3; ++i) {                                                \
                    const int64_t iy = y * d->stride_h - d->pad_top + i;                         \
                    if (iy < 0 || iy >= d->h)                                                    \
                        continue;                                                                \
                    for (int64_t j = 0; j < 3; ++j) {                                            \
                        const int64_t ix = x * d->stride_w - d->pad_left + j;                    \
                        if (ix >= 0 && ix < d->w)                                                \
                            sum += wt[i * 3 + j] * in[iy * d->w + ix];                           \
                    }                                                                            \
                }                                                                                \
                out[y * d->out_w + x] = sum;                                                     \
            }                                                                                    \
    }
SCALAR_ROWS(float, f32)
SCALAR_ROWS(double, f64)

void pcm_dw3x3_rows_f32(const pcm_conv_desc *d, const float *in, const float *wt, float bias,
                        float *out, int64_t y0, int64_t y1)
{
#ifdef HAVE_DW_AVX512
    if (pcm_simd() == PCM_SIMD_AVX512) {
        dw_rows_avx512_f32(d, in, wt, bias, out, y0, y1);
        return;
    }
#endif
    scalar_rows_f32(d, in, wt, bias, out, y0, y1);
}

void pcm_dw3x3_rows_f64(const pcm_conv_desc *d, const double *in, const double *wt, double bias,
                        double *out, int64_t y0, int64_t y1)
{
#ifdef HAVE_DW_AVX512
    if (pcm_simd() == PCM_SIMD_AVX512) {
        dw_rows_avx512_f64(d, in, wt, bias, out, y0, y1);
        return;
    }
#endif
    scalar_rows_f64(d, in, wt, bias, out, y0, y1);
}
