/* AVX-512 tile kernels (compiled with -mavx512f -mavx512dq -mfma, called only when
 * pcm_simd() reports AVX-512). 32 vector registers hold up to 24 accumulators. */
#include <immintrin.h>

#include "tiles.h"

#define ISA_NAME "avx512"

static inline __mmask16 range_mask16(int64_t lo, int64_t hi)
{
    lo = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
    hi = hi < 0 ? 0 : (hi > 16 ? 16 : hi);
    if (hi <= lo)
        return 0;
    return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

#define TILES(X) X(24, 1) X(16, 1) X(12, 2) X(8, 3) X(6, 4) X(4, 4) X(4, 6) X(3, 4) X(3, 8) \
    X(2, 4) X(2, 8) X(1, 4) X(1, 8)
#define DOTS(X) X(4, 6) X(2, 8) X(1, 12)

#define T float
#define SFX f32_avx512
#define VL 16
#define VEC __m512
#define MASK __mmask16
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(x) _mm512_set1_ps(x)
#define V_LOADU(p) _mm512_loadu_ps(p)
#define V_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm512_add_ps((a), (b))
#define V_REDUCE(v) ((double)_mm512_reduce_add_ps(v))
#define V_MASK(lo, hi) range_mask16((lo), (hi))
#include "tiles.inc"
#undef T
#undef SFX
#undef VL
#undef VEC
#undef MASK
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_MLOAD
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_REDUCE
#undef V_MASK

/* Transpose one 8 x 8 block of doubles: pairs of rows interleave, then 128-bit lanes are
 * gathered twice. */
static inline void transpose8_f64(double *dst, int64_t ldd, const double *src, int64_t lds)
{
    __m512d r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i)
        r[i] = _mm512_loadu_pd(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        /* Columns 0, 2, 4, 6 (lo) and 1, 3, 5, 7 (hi) of rows i and i + 1, interleaved. */
        t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    /* u[i .. i + 3] hold columns (0, 4), (2, 6), (1, 5) and (3, 7) of rows i .. i + 3. */
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0x88);
        u[i + 1] = _mm512_shuffle_f64x2(t[i], t[i + 2], 0xDD);
        u[i + 2] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0x88);
        u[i + 3] = _mm512_shuffle_f64x2(t[i + 1], t[i + 3], 0xDD);
    }
    _mm512_storeu_pd(dst + 0 * ldd, _mm512_shuffle_f64x2(u[0], u[4], 0x88));
    _mm512_storeu_pd(dst + 4 * ldd, _mm512_shuffle_f64x2(u[0], u[4], 0xDD));
    _mm512_storeu_pd(dst + 2 * ldd, _mm512_shuffle_f64x2(u[1], u[5], 0x88));
    _mm512_storeu_pd(dst + 6 * ldd, _mm512_shuffle_f64x2(u[1], u[5], 0xDD));
    _mm512_storeu_pd(dst + 1 * ldd, _mm512_shuffle_f64x2(u[2], u[6], 0x88));
    _mm512_storeu_pd(dst + 5 * ldd, _mm512_shuffle_f64x2(u[2], u[6], 0xDD));
    _mm512_storeu_pd(dst + 3 * ldd, _mm512_shuffle_f64x2(u[3], u[7], 0x88));
    _mm512_storeu_pd(dst + 7 * ldd, _mm512_shuffle_f64x2(u[3], u[7], 0xDD));
}

#define T double
#define SFX f64_avx512
#define V_TRANSPOSE8(dst, ldd, src, lds) transpose8_f64((dst), (ldd), (src), (lds))
#define VL 8
#define VEC __m512d
#define MASK __mmask8
#define V_ZERO() _mm512_setzero_pd()
#define V_SET1(x) _mm512_set1_pd(x)
#define V_LOADU(p) _mm512_loadu_pd(p)
#define V_MLOAD(p, m) _mm512_maskz_loadu_pd((m), (p))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define V_ADD(a, b) _mm512_add_pd((a), (b))
#define V_REDUCE(v) _mm512_reduce_add_pd(v)
#define V_MASK(lo, hi) ((__mmask8)range_mask16((lo) < 8 ? (lo) : 8, (hi) < 8 ? (hi) : 8))
#include "tiles.inc"
