/* Register-tile micro-kernels shared by the fast convolution drivers.
 *
 * Each ISA (AVX-512, AVX2 + FMA, portable scalar) instantiates the same kernels from tiles.inc
 * (GEMM, direct and dot tiles, the plane kernel, a transpose and an FMA loop) for float32 and float64. The
 * drivers pick a set at run time with pcm_tiles().
 * All lengths are element counts. Loads that could leave an array are masked, so a tile never
 * reads outside the rows it is given and never writes outside the columns it stores. */
#ifndef PYCONVMPI_TILES_H
#define PYCONVMPI_TILES_H

#include <stdint.h>

#include "pcm_internal.h"

/* Largest register tile of any ISA: accumulator arrays are sized by these. */
#define PCM_TILE_KB_MAX 24
#define PCM_TILE_XV_MAX 8
/* Widest kernel the direct tile accepts (its column masks live on the stack). */
#define PCM_DIRECT_S_MAX 32

/* C[kb][x] (+)= sum over d of A[d][kb] * B[d][x], kb < kvalid, x < pvalid.
 * A is packed [depth][KB] with zero rows past kvalid; B has depth rows of at least pvalid
 * readable elements each, ldb apart. With accumulate == 0 the tile starts from bias[kb]
 * (bias may be NULL: zero); otherwise from C. */
typedef struct pcm_gemm_args {
    const void *a;
    const void *b;
    int64_t ldb;
    int64_t depth;
    void *c;
    int64_t ldc;
    int64_t kvalid, pvalid;
    const void *bias;
    int accumulate;
} pcm_gemm_args;

/* Direct convolution of one output row segment, horizontal stride 1:
 *   out[kb][x] (+)= sum over (ci, i, j) of wp[ci][i][j][kb] * in[ci][row_offset[i] + col0 + x + j * dw]
 * for x < xvalid. row_offset[i] is iy * w of the input row tap i reads, or -1 when that row lies
 * outside the image (the tap adds nothing); columns outside [0, w) read as zero. */
typedef struct pcm_direct_args {
    const void *in;
    int64_t in_cs;
    int64_t w;
    const void *wp;
    int64_t c, r, s, dw;
    const int64_t *row_offset;
    int64_t col0;
    void *out;
    int64_t out_ks;
    int64_t kvalid, xvalid;
    const void *bias;
    int accumulate;
} pcm_direct_args;

/* acc[kb * ldacc + cb] += sum over p < len of a[kb][p] * b[cb][p] for kb < kvalid, cb < cvalid,
 * with rows lda and ldb apart; the sums are added in float64. */
typedef struct pcm_dot_args {
    const void *a;
    int64_t lda;
    const void *b;
    int64_t ldb;
    int64_t len;
    int64_t kvalid, cvalid;
    double *acc;
    int64_t ldacc;
} pcm_dot_args;

/* Output rows [y0, y1) of one output plane, horizontal stride 1, for layers with few input
 * channels per output channel (depthwise, image filters):
 *   out[y][x] = bias + sum over (ci, i, j) of wt[ci][i][j] * in[ci][y * stride_h - pad_top + i * dh]
 *                                                              [x - pad_left + j * dw]
 * with input rows and columns outside the h x w image reading as zero. */
typedef struct pcm_plane_args {
    const void *in;
    int64_t in_cs, h, w;
    int64_t c;
    const void *wt;
    int64_t r, s, dh, dw, stride_h, pad_top, pad_left;
    void *out;
    int64_t out_w, y0, y1;
    double bias;
} pcm_plane_args;

/* Weight gradient of a 3x3 layer with one input and one output channel per group, over output
 * rows [y0, y1) of one plane, horizontal stride 1:
 *   acc[i * 3 + j] += sum over (y, x) of go[y][x] * in[y * stride_h - pad_top + i * dh]
 *                                                     [x - pad_left + j * dw]
 * with input elements outside the h x w image reading as zero. */
typedef struct pcm_plane_dot_args {
    const void *go;
    int64_t out_w, y0, y1;
    const void *in;
    int64_t h, w, dh, dw, stride_h, pad_top, pad_left;
    double *acc;
} pcm_plane_dot_args;

typedef void (*pcm_gemm_tile_fn)(const pcm_gemm_args *args);
typedef void (*pcm_direct_tile_fn)(const pcm_direct_args *args);
typedef void (*pcm_dot_tile_fn)(const pcm_dot_args *args);
typedef void (*pcm_plane_fn)(const pcm_plane_args *args);
typedef void (*pcm_plane_dot_fn)(const pcm_plane_dot_args *args);
/* dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (element counts). */
typedef void (*pcm_transpose_fn)(void *dst, int64_t ldd, const void *src, int64_t lds,
                                 int64_t rows, int64_t cols);

/* One register tile: kb output channels by xv vectors of output columns. */
typedef struct pcm_tile {
    int kb, xv;
    pcm_gemm_tile_fn gemm;
    pcm_direct_tile_fn direct;
} pcm_tile;

/* One dot tile: kb rows of A by cb rows of B. */
typedef struct pcm_dot_tile {
    int kb, cb;
    pcm_dot_tile_fn dot;
} pcm_dot_tile;

typedef struct pcm_tile_set {
    const char *isa;
    int vl; /* elements per vector */
    int ntiles;
    const pcm_tile *tiles;
    int ndots;
    const pcm_dot_tile *dots;
    /* Run `iterations` steps of 16 independent vector multiply-add chains; returns a value
     * that depends on every chain, so the loop cannot be removed. */
    double (*fma_loop)(int64_t iterations);
    pcm_plane_fn plane;
    pcm_plane_dot_fn plane_dot3x3;
    pcm_transpose_fn transpose;
} pcm_tile_set;

#define PCM_DECLARE_TILE_SET(isa)                                                             \
    PCM_INTERNAL extern const pcm_tile_set pcm_tiles_f32_##isa;                               \
    PCM_INTERNAL extern const pcm_tile_set pcm_tiles_f64_##isa;

PCM_DECLARE_TILE_SET(scalar)
#if defined(__x86_64__)
PCM_DECLARE_TILE_SET(avx2)
PCM_DECLARE_TILE_SET(avx512)
#endif

/* Tile set for a dtype on the SIMD level this CPU supports. */
PCM_INTERNAL const pcm_tile_set *pcm_tiles(int dtype);

#endif /* PYCONVMPI_TILES_H */
