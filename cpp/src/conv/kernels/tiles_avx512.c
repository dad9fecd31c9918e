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

#define T double
#define SFX f64_avx512
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
