/* Few-channel convolution for image filters and first layers: 1-4 input channels per group,
 * horizontal stride 1, up to 8 output channels per group forward and 16 for weight gradients.
 * Float32 and float64 have AVX-512, AVX2 + FMA and portable kernels, chosen at run time.
 *
 * Forward: with so few channels, output channels alone cannot fill a register tile. A tile
 * therefore keeps KB output channels x RB output rows x XV vectors of output columns in
 * registers and broadcasts each weight into KB * RB * XV multiply-adds. Input rows are first
 * copied into a per-thread buffer with zero padding, which removes every mask from the tile's
 * loads. The buffer's row pitch is kept off multiples of 512 bytes, so that the rows a tile
 * reads do not all map to the same few L1 sets, as the rows of a 1024-float image would.
 *
 * Weight gradient: a tile sums KB output-gradient rows times TB shifted input rows (taps) of
 * one input channel over a band of output rows in vector registers, then adds the lane sums
 * to a float64 accumulator per thread; the copies are added at the end. No im2col. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "conv/conv_depthwise.h"
#include "conv/conv_fast.h"
#include "conv/conv_fewchan.h"

/* Largest tile dimensions of any ISA, which size the accumulator arrays. */
#define FC_KB_MAX 8
#define FC_RB_MAX 8
#define FC_XV_MAX 8
#define FC_TB_MAX 9
/* Edge chunks per side whose weight-gradient masks are computed once per tile call. */
#define FC_EDGE_MAX 4

/* Largest staging buffer per thread. Wider images or taller kernels use the other kernels. */
#define FC_STAGE_MAX_BYTES ((int64_t)8 << 20)

/* Output tile of the forward kernel. The tile reads staged rows: row q of channel ci starts at
 * buf + ci * cs + q * ldb. Output row rr, kernel tap (i, j) and vector v read
 * buf[ci * cs + (rr * sh + i * dh) * ldb + j * dw + v * VL + lane]. wp contains the weights as
 * [c][r][s][KB] and bias KB values, both zero past kvalid. The tile stores kvalid channels
 * (out_ks apart) x nrows rows (out_rs apart) x xvalid columns. */
typedef struct fc_forward_args {
    const void *buf;
    int64_t ldb, cs;
    int64_t c, r, s, dh, dw, sh;
    const void *wp;
    const void *bias;
    void *out;
    int64_t out_ks, out_rs;
    int64_t kvalid, nrows, xvalid;
} fc_forward_args;

/* Weight-gradient tile over output rows [y0, y1) of one image:
 *   acc[kb * acc_ks + t] += sum over (y, x) of go[kb][y][x] *
 *       in[y * stride_h - pad_top + tap_i[t] * dh][x - pad_left + tap_j[t] * dw]
 * for kb < kvalid and t < tvalid, with input elements outside the h x w image reading as zero.
 * go points at row y0 of the first channel, with channels go_ks apart. zero_row contains w
 * zeros. */
typedef struct fc_weight_args {
    const void *go;
    int64_t go_ks, out_w, y0, y1;
    const void *in;
    int64_t h, w, stride_h, pad_top, pad_left, dh, dw;
    const int64_t *tap_i, *tap_j;
    int64_t kvalid, tvalid;
    const void *zero_row;
    double *acc;
    int64_t acc_ks;
} fc_weight_args;

typedef struct fc_forward_tile {
    int kb, rb, xv;
    void (*fn)(const fc_forward_args *args);
} fc_forward_tile;

typedef struct fc_weight_tile {
    int kb, tb;
    void (*fn)(const fc_weight_args *args);
} fc_weight_tile;

typedef struct fc_kernel_set {
    int vl;
    int nforward;
    const fc_forward_tile *forward;
    int nforward3x3;
    const fc_forward_tile *forward3x3;
    int nweight;
    const fc_weight_tile *weight;
    void (*stage_rows)(void *dst, int64_t ldb, const void *src, int64_t src_ld, int64_t rows,
                       int64_t row_lo, int64_t row_hi, int64_t len, int64_t lo, int64_t hi);
    double (*rows_sum)(const void *p, int64_t ld, int64_t rows, int64_t len);
} fc_kernel_set;

/* Portable kernels: one element per "vector", no ISA flags. Tiles of 2-8 columns. */
#define ISA_TARGET
#define VL 1
#define MASK int
#define V_SET1(x) (x)
#define V_LOADU(p) (*(p))
#define V_STOREU(p, v) (*(p) = (v))
#define V_MSTORE(p, m, v) do { if (m) *(p) = (v); } while (0)
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_ADD(a, b) ((a) + (b))
#define V_MASK(lo, hi) ((lo) <= 0 && (hi) > 0)
#define V_REDUCE(v) ((double)(v))
#define V_KEEP(v) ((void)0)
#define FWD_TILES(X) X(1, 4, 4) X(1, 2, 8) X(2, 2, 4) X(2, 1, 8) X(3, 1, 4) X(4, 1, 4) \
    X(5, 1, 2) X(6, 1, 2) X(7, 1, 2) X(8, 1, 2)
#define FWD3X3_TILES(X) X(1, 1, 4)
#define WGT_TILES(X) X(1, 9) X(1, 3) X(2, 3) X(3, 3) X(4, 3)
#define T float
#define SFX f32_scalar
#define VEC float
#define V_ZERO() 0.0f
#define V_MLOAD(p, m) ((m) ? *(p) : 0.0f)
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VEC
#undef V_ZERO
#undef V_MLOAD
#define T double
#define SFX f64_scalar
#define VEC double
#define V_ZERO() 0.0
#define V_MLOAD(p, m) ((m) ? *(p) : 0.0)
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VEC
#undef V_ZERO
#undef V_MLOAD
#undef ISA_TARGET
#undef VL
#undef MASK
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_MASK
#undef V_REDUCE
#undef V_KEEP
#undef FWD_TILES
#undef FWD3X3_TILES
#undef WGT_TILES

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_FC_X86 1
#define V_KEEP(v) __asm__("" : "+v"(v))

/* AVX2 + FMA: 16 vector registers, so tiles of at most 12 accumulators. vmaskmov loads do
 * not fault on masked-out lanes. */
#define ISA_TARGET __attribute__((target("avx2,fma")))
#define FWD_TILES(X) X(1, 8, 1) X(1, 6, 2) X(1, 4, 3) X(2, 6, 1) X(2, 3, 2) X(2, 2, 3) \
    X(3, 4, 1) X(3, 2, 2) X(3, 1, 3) X(4, 3, 1) X(4, 1, 2) X(4, 1, 3) X(5, 2, 1) X(5, 1, 2) \
    X(6, 2, 1) X(6, 1, 2) X(7, 1, 1) X(8, 1, 1)
#define FWD3X3_TILES(X) X(1, 4, 1) X(1, 2, 2)
#define WGT_TILES(X) X(1, 9) X(1, 3) X(2, 3) X(3, 3) X(4, 3)

ISA_TARGET static inline __m256i fc_mask_epi32(int64_t lo, int64_t hi)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = lo < 0 ? 0 : (lo > 8 ? 8 : lo);
    hi = hi < 0 ? 0 : (hi > 8 ? 8 : hi);
    return _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), lane),
                            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32((int)lo - 1)));
}

ISA_TARGET static inline __m256i fc_mask_epi64(int64_t lo, int64_t hi)
{
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    lo = lo < 0 ? 0 : (lo > 4 ? 4 : lo);
    hi = hi < 0 ? 0 : (hi > 4 ? 4 : hi);
    return _mm256_and_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), lane),
                            _mm256_cmpgt_epi64(lane, _mm256_set1_epi64x(lo - 1)));
}

ISA_TARGET static inline double fc_reduce_ps256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return (double)_mm_cvtss_f32(s);
}

ISA_TARGET static inline double fc_reduce_pd256(__m256d v)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}

#define MASK __m256i
#define T float
#define SFX f32_avx2
#define VL 8
#define VEC __m256
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(x) _mm256_set1_ps(x)
#define V_LOADU(p) _mm256_loadu_ps(p)
#define V_STOREU(p, v) _mm256_storeu_ps((p), (v))
#define V_MLOAD(p, m) _mm256_maskload_ps((p), (m))
#define V_MSTORE(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm256_add_ps((a), (b))
#define V_REDUCE(v) fc_reduce_ps256(v)
#define V_MASK(lo, hi) fc_mask_epi32((lo), (hi))
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VL
#undef VEC
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
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
#define V_ZERO() _mm256_setzero_pd()
#define V_SET1(x) _mm256_set1_pd(x)
#define V_LOADU(p) _mm256_loadu_pd(p)
#define V_STOREU(p, v) _mm256_storeu_pd((p), (v))
#define V_MLOAD(p, m) _mm256_maskload_pd((p), (m))
#define V_MSTORE(p, m, v) _mm256_maskstore_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define V_ADD(a, b) _mm256_add_pd((a), (b))
#define V_REDUCE(v) fc_reduce_pd256(v)
#define V_MASK(lo, hi) fc_mask_epi64((lo), (hi))
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VL
#undef VEC
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
#undef V_MLOAD
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_REDUCE
#undef V_MASK
#undef MASK
#undef ISA_TARGET
#undef FWD_TILES
#undef FWD3X3_TILES
#undef WGT_TILES

/* AVX-512: 32 vector registers, tiles of up to 24 accumulators. */
#define ISA_TARGET __attribute__((target("avx512f,avx512dq,fma")))
#define FWD_TILES(X) X(1, 8, 1) X(1, 8, 2) X(1, 8, 3) X(2, 8, 1) X(2, 6, 2) X(2, 4, 3) \
    X(3, 8, 1) X(3, 4, 2) X(3, 2, 3) X(4, 6, 1) X(4, 3, 2) X(4, 2, 3) X(5, 4, 1) X(5, 2, 2) \
    X(5, 1, 3) X(6, 4, 1) X(6, 2, 2) X(6, 1, 3) X(7, 3, 1) X(7, 1, 3) X(8, 3, 1) X(8, 1, 3)
#define FWD3X3_TILES(X) X(1, 8, 1) X(1, 8, 2) X(1, 4, 3)
#define WGT_TILES(X) X(1, 9) X(2, 9) X(3, 9) X(1, 3) X(2, 3) X(3, 3) X(4, 3) X(5, 3) X(6, 3) \
    X(8, 3)

ISA_TARGET static inline __mmask16 fc_mask16(int64_t lo, int64_t hi)
{
    lo = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
    hi = hi < 0 ? 0 : (hi > 16 ? 16 : hi);
    if (hi <= lo)
        return 0;
    return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

#define T float
#define SFX f32_avx512
#define VL 16
#define VEC __m512
#define MASK __mmask16
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(x) _mm512_set1_ps(x)
#define V_LOADU(p) _mm512_loadu_ps(p)
#define V_STOREU(p, v) _mm512_storeu_ps((p), (v))
#define V_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_ADD(a, b) _mm512_add_ps((a), (b))
#define V_REDUCE(v) ((double)_mm512_reduce_add_ps(v))
#define V_MASK(lo, hi) fc_mask16((lo), (hi))
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VL
#undef VEC
#undef MASK
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
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
#define V_STOREU(p, v) _mm512_storeu_pd((p), (v))
#define V_MLOAD(p, m) _mm512_maskz_loadu_pd((m), (p))
#define V_MSTORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
#define V_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define V_ADD(a, b) _mm512_add_pd((a), (b))
#define V_REDUCE(v) _mm512_reduce_add_pd(v)
#define V_MASK(lo, hi) ((__mmask8)fc_mask16((lo) < 8 ? (lo) : 8, (hi) < 8 ? (hi) : 8))
#include "conv2d_fewchan.inc"
#undef T
#undef SFX
#undef VL
#undef VEC
#undef MASK
#undef V_ZERO
#undef V_SET1
#undef V_LOADU
#undef V_STOREU
#undef V_MLOAD
#undef V_MSTORE
#undef V_FMA
#undef V_ADD
#undef V_REDUCE
#undef V_MASK
#undef ISA_TARGET
#undef FWD_TILES
#undef FWD3X3_TILES
#undef WGT_TILES
#undef V_KEEP
#endif

/* Kernels of the CPU's SIMD level (PYCONVMPI_SIMD may cap it) for a dtype. */
static const fc_kernel_set *kernels_for(int dtype)
{
    const int f64 = dtype == PCM_FLOAT64;
#ifdef HAVE_FC_X86
    switch (pcm_simd()) {
    case PCM_SIMD_AVX512: return f64 ? &fc_kernels_f64_avx512 : &fc_kernels_f32_avx512;
    case PCM_SIMD_AVX2: return f64 ? &fc_kernels_f64_avx2 : &fc_kernels_f32_avx2;
    default: break;
    }
#endif
    return f64 ? &fc_kernels_f64_scalar : &fc_kernels_f32_scalar;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

/* Fraction of a tile's lanes doing useful work when `count` items are cut into tiles of
 * `size`. */
static double fill(int64_t count, int64_t size)
{
    if (count <= 0)
        return 1.0;
    return (double)count / (double)(ceil_div(count, size) * size);
}

/* Layers with one input and one output channel per group that the depthwise kernels keep:
 * those with several groups, and single filters on single-channel images where the depthwise
 * 3x3 kernels fit. On 500 cached 32x32 images those took 0.05 ms against 0.12 ms here, and
 * the same time once the images were evicted from the caches. */
static int is_depthwise(const pcm_conv_desc *d)
{
    if (d->c != d->groups || d->k != d->groups)
        return 0;
    return d->groups > 1 || pcm_dw3x3_fits(d);
}

/* Output channels per tile: the kg channels of a group cut into equal blocks of at most
 * FC_KB_MAX. */
static int64_t forward_kb(int64_t kg)
{
    return ceil_div(kg, ceil_div(kg, FC_KB_MAX));
}

/* The forward tile with forward_kb(kg) channels that wastes the fewest lanes on the image's
 * rows and columns, with a mild preference for more accumulators. Layers with one output
 * channel per group and a plain 3x3 kernel take a tile of the 3x3 kernel. */
static const fc_forward_tile *choose_forward(const fc_kernel_set *set, const pcm_conv_desc *d)
{
    const int64_t kg = d->k / d->groups, out_h = d->out_h, out_w = d->out_w;
    const int64_t kb = forward_kb(kg);
    const int plain3x3 = kg == 1 && d->r == 3 && d->s == 3 && d->stride_h == 1 &&
                         d->dilation_h == 1 && d->dilation_w == 1;
    const int ntiles = plain3x3 ? set->nforward3x3 : set->nforward;
    const fc_forward_tile *tiles = plain3x3 ? set->forward3x3 : set->forward;
    const fc_forward_tile *best = NULL;
    double best_score = -1.0;
    for (int t = 0; t < ntiles; ++t) {
        const fc_forward_tile *tile = &tiles[t];
        const double acc = (double)(tile->kb * tile->rb * tile->xv);
        if (tile->kb != kb)
            continue;
        const double score = fill(out_w, (int64_t)tile->xv * set->vl) * fill(out_h, tile->rb) *
                             acc / (acc + 4.0);
        if (score > best_score) {
            best_score = score;
            best = tile;
        }
    }
    return best;
}

/* Staging layout of a forward call: columns per staged row, row pitch, output rows per stage
 * and staged rows per channel. */
typedef struct fc_stage {
    int64_t cols, ldb, stage_rows, rows;
} fc_stage;

static fc_stage stage_layout(const pcm_conv_desc *d, const fc_forward_tile *tile, int vl,
                             size_t elem)
{
    const int64_t cg = d->c / d->groups;
    fc_stage st;
    st.cols = round_up(d->out_w, (int64_t)tile->xv * vl) + (d->s - 1) * d->dilation_w;
    st.ldb = round_up(st.cols, 16);
    /* A pitch that is a multiple of 512 bytes puts every staged row into the same few L1 sets. */
    if ((st.ldb * (int64_t)elem) % 512 == 0)
        st.ldb += 16;
    /* As many row blocks per stage as fit in 64 KiB, at least one. */
    st.stage_rows = tile->rb;
    for (;;) {
        const int64_t next = st.stage_rows + tile->rb;
        const int64_t rows = (next - 1) * d->stride_h + (d->r - 1) * d->dilation_h + 1;
        if (next > round_up(d->out_h, tile->rb) ||
            cg * rows * st.ldb * (int64_t)elem > ((int64_t)64 << 10))
            break;
        st.stage_rows = next;
    }
    st.rows = (st.stage_rows - 1) * d->stride_h + (d->r - 1) * d->dilation_h + 1;
    return st;
}

int pcm_fewchan_forward_fits(int dtype, const pcm_conv_desc *d)
{
    const int64_t cg = d->c / d->groups, kg = d->k / d->groups;
    if (d->stride_w != 1 || cg > FC_C_MAX || kg > FC_K_MAX_FORWARD || is_depthwise(d))
        return 0;
    const fc_kernel_set *set = kernels_for(dtype);
    const fc_forward_tile *tile = choose_forward(set, d);
    const size_t elem = dtype == PCM_FLOAT64 ? sizeof(double) : sizeof(float);
    if (tile == NULL)
        return 0;
    const fc_stage st = stage_layout(d, tile, set->vl, elem);
    return cg * st.rows * st.ldb * (int64_t)elem <= FC_STAGE_MAX_BYTES;
}

int pcm_fewchan_weight_fits(const pcm_conv_desc *d)
{
    const int64_t cg = d->c / d->groups, kg = d->k / d->groups;
    /* A single 3x3 filter keeps the plane kernel of conv2d_fast.c, which shares its column
     * masks between the three kernel rows and measured faster on 32x32 images. */
    const int single_3x3 = d->c == d->groups && d->k == d->groups && d->r == 3 && d->s == 3;
    return d->stride_w == 1 && cg <= FC_C_MAX && kg <= FC_K_MAX_WEIGHT && !is_depthwise(d) &&
           !single_3x3;
}

/* The weight-gradient tile with the lowest estimated cost. Per vector of output columns a tile
 * makes kb * tb multiply-adds and kb + tb loads. The estimate assumes that the CPU issues both
 * at about the same rate (two per cycle on recent x86 cores) and adds a fixed overhead. */
static const fc_weight_tile *choose_weight(const fc_kernel_set *set, int64_t kg, int64_t taps)
{
    const fc_weight_tile *best = NULL;
    double best_cost = 0.0;
    for (int t = 0; t < set->nweight; ++t) {
        const fc_weight_tile *tile = &set->weight[t];
        const double fmas = (double)(tile->kb * tile->tb), loads = (double)(tile->kb + tile->tb);
        const double cost = (double)(ceil_div(kg, tile->kb) * ceil_div(taps, tile->tb)) *
                            ((fmas > loads ? fmas : loads) + 4.0);
        if (best == NULL || cost < best_cost) {
            best = tile;
            best_cost = cost;
        }
    }
    return best;
}

/* When a forward task is a whole image, it prefetches the input of the task this many tasks
 * ahead if that input is at most FC_PREFETCH_MAX_BYTES. Small images fill one or a few 4 KiB
 * pages each, and hardware prefetchers stop at page boundaries. Without the prefetch, every
 * image of a batch that is not in the caches starts with misses at memory latency. 500
 * single-channel 32x32 images took 0.24 ms with the input evicted and 0.18 ms with this
 * prefetch, against 0.15 ms with the input in the caches (one thread, AMD EPYC). */
#define FC_PREFETCH_TASKS 2
#define FC_PREFETCH_MAX_BYTES ((int64_t)16 << 10)

/* Output pixels per weight-gradient band: the band's rows stay in L2 and each lane sums at
 * most 8192 / VL products in the working precision before the float64 accumulator. */
#define FC_BAND_PIXELS 8192

#define T float
#define SUFFIX f32
#define DTYPE PCM_FLOAT32
#include "conv2d_fewchan_driver.inc"
#undef T
#undef SUFFIX
#undef DTYPE

#define T double
#define SUFFIX f64
#define DTYPE PCM_FLOAT64
#include "conv2d_fewchan_driver.inc"
#undef T
#undef SUFFIX
#undef DTYPE
