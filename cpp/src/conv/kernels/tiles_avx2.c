/* AVX2 + FMA tile kernels (compiled with -mavx2 -mfma, called only when pcm_simd() reports
 * AVX2 or better). 16 vector registers hold up to 12 accumulators. Masked loads use
 * vmaskmov, which does not fault on masked-out lanes. */
#include <immintrin.h>

#include "tiles.h"

#define ISA_NAME "avx2"

static inline __m256i range_mask_epi32(int64_t lo, int64_t hi)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = lo < 0 ? 0 : (lo > 8 ? 8 : lo);
    hi = hi < 0 ? 0 : (hi > 8 ? 8 : hi);
    return _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), lane),
                            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32((int)lo - 1)));
}

static inline __m256i range_mask_epi64(int64_t lo, int64_t hi)
{
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    lo = lo < 0 ? 0 : (lo > 4 ? 4 : lo);
    hi = hi < 0 ? 0 : (hi > 4 ? 4 : hi);
    return _mm256_and_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), lane),
                            _mm256_cmpgt_epi64(lane, _mm256_set1_epi64x(lo - 1)));
}

static inline double reduce_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return (double)_mm_cvtss_f32(s);
}

static inline double reduce_pd(__m256d v)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}

#define TILES(X) X(12, 1) X(6, 2) X(4, 3) X(3, 4) X(2, 4) X(2, 6) X(1, 4) X(1, 8)
#define DOTS(X) X(3, 4) X(2, 6) X(1, 8)

#define T float
#define SFX f32_avx2
#define VL 8
#define VEC __m256
#define MASK __m256i
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(x) _mm256_set1_ps(x)
#define V_LOADU(p) _mm256_loadu_ps(p)
#define V_MLOAD(p, m) _mm256_maskload_ps((p), (m))
#define V_MSTORE(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm256_add_ps((a), (b))
#define V_REDUCE(v) reduce_ps(v)
#define V_MASK(lo, hi) range_mask_epi32((lo), (hi))
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
#define SFX f64_avx2
#define VL 4
#define VEC __m256d
#define MASK __m256i
#define V_ZERO() _mm256_setzero_pd()
#define V_SET1(x) _mm256_set1_pd(x)
#define V_LOADU(p) _mm256_loadu_pd(p)
#define V_MLOAD(p, m) _mm256_maskload_pd((p), (m))
#define V_MSTORE(p, m, v) _mm256_maskstore_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define V_ADD(a, b) _mm256_add_pd((a), (b))
#define V_REDUCE(v) reduce_pd(v)
#define V_MASK(lo, hi) range_mask_epi64((lo), (hi))
#include "tiles.inc"
