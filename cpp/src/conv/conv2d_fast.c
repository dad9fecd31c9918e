/* Fast convolution drivers: GEMM over im2col tiles and the register-tiled direct kernel, for
 * float32 and float64 (conv2d_fast.inc), on the tile kernels of the CPU's SIMD level. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "conv/conv_depthwise.h"
#include "conv/conv_fast.h"

void *pcm_alloc64(size_t bytes)
{
    void *p = NULL;
    size_t rounded = (bytes + 63) / 64 * 64;
    if (posix_memalign(&p, 64, rounded > 0 ? rounded : 64) != 0)
        return NULL;
    return p;
}

/* Multiply-adds below which one more thread costs more to wake than it saves (about 5 us of
 * work on one core). */
#define WORK_PER_THREAD ((int64_t)1 << 18)

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Fraction of a tile's lanes doing useful work when `count` items are cut into tiles of
 * `size`. */
static double fill(int64_t count, int64_t size)
{
    if (count <= 0)
        return 1.0;
    return (double)count / (double)(ceil_div(count, size) * size);
}

/* Choose a tile as pcm_choose_tile does. With tall_only, consider only tiles with kb >= xv and
 * return NULL when none of them fits. */
static const pcm_tile *choose_tile(const pcm_tile_set *set, int64_t rows, int64_t cols,
                                   const pcm_exec *e, int tall_only)
{
    int max_kb = 0, max_area = 0;
    const pcm_tile *best = NULL;
    double best_score = -1.0;

    /* block_k and block_w cap the tile; the largest instantiated size below the cap is used. */
    for (int t = 0; t < set->ntiles; ++t) {
        const pcm_tile *tile = &set->tiles[t];
        if (tile->kb * tile->xv > max_area)
            max_area = tile->kb * tile->xv;
        if (e != NULL && e->block_k > 0 && tile->kb <= e->block_k && tile->kb > max_kb)
            max_kb = tile->kb;
    }
    if (e != NULL && e->block_k > 0 && max_kb == 0)
        max_kb = set->tiles[0].kb;
    for (int t = 0; t < set->ntiles; ++t) {
        const pcm_tile *tile = &set->tiles[t];
        const int64_t width = (int64_t)tile->xv * set->vl;
        if (max_kb > 0 && tile->kb != max_kb)
            continue;
        if (tall_only && tile->kb < tile->xv)
            continue;
        if (e != NULL && e->block_w > 0 && width > e->block_w && tile->xv > 1)
            continue;
        /* Useful lanes, times how full the register file is, times a small preference for
         * tiles that load fewer operands per multiply-add. */
        double score = fill(rows, tile->kb) * fill(cols, width) *
                       (double)(tile->kb * tile->xv) / (double)max_area *
                       (1.0 - 0.05 * (double)(tile->kb + tile->xv) / (double)(tile->kb * tile->xv));
        if (score > best_score) {
            best_score = score;
            best = tile;
        }
    }
    if (best == NULL && tall_only)
        return NULL;
    if (best == NULL) {
        /* block_w below every width of this block_k: take its narrowest tile. */
        for (int t = 0; t < set->ntiles; ++t)
            if (set->tiles[t].kb == max_kb && (best == NULL || set->tiles[t].xv < best->xv))
                best = &set->tiles[t];
    }
    return best != NULL ? best : &set->tiles[0];
}

const pcm_tile *pcm_choose_tile(const pcm_tile_set *set, int64_t rows, int64_t cols,
                                const pcm_exec *e)
{
    return choose_tile(set, rows, cols, e, 0);
}

/* Tile of a GEMM whose B rows lie far apart: im2col rows gathered from many small images, or
 * the grad_output planes of the strided backward data. Such a B panel outgrows L1, so each
 * tile step should load few B vectors and broadcast many weights. Tiles set through block_k
 * or block_w are left as asked. */
static const pcm_tile *choose_gather_tile(const pcm_tile_set *set, int64_t rows, int64_t cols,
                                          const pcm_exec *e)
{
    const pcm_tile *tile = NULL;
    if (e == NULL || (e->block_k <= 0 && e->block_w <= 0))
        tile = choose_tile(set, rows, cols, e, 1);
    return tile != NULL ? tile : pcm_choose_tile(set, rows, cols, e);
}

const pcm_dot_tile *pcm_choose_dot(const pcm_tile_set *set, int64_t rows, const pcm_exec *e)
{
    const int64_t cap = (e != NULL && e->block_k > 0) ? e->block_k : rows;
    const pcm_dot_tile *best = &set->dots[set->ndots - 1];
    for (int t = 0; t < set->ndots; ++t)
        if (set->dots[t].kb <= cap && set->dots[t].kb > best->kb)
            best = &set->dots[t];
    return best;
}

int pcm_work_threads(const pcm_conv_desc *d, const pcm_exec *e)
{
    const int64_t macs = d->n * d->k * d->out_h * d->out_w * (d->c / d->groups) * d->r * d->s;
    const int64_t useful = 1 + macs / WORK_PER_THREAD;
    const int threads = pcm_threads(e);
    return useful < threads ? (int)useful : threads;
}

int pcm_simd_direct_fits(const pcm_conv_desc *d)
{
    return d->stride_w == 1 && d->s <= PCM_DIRECT_S_MAX;
}

pcm_status pcm_peak_gflops(int dtype, int64_t threads, double seconds, double *gflops_out)
{
    if ((dtype != PCM_FLOAT32 && dtype != PCM_FLOAT64) || threads < 0 || gflops_out == NULL ||
        !(seconds > 0.0 && seconds <= 10.0))
        return PCM_ERR_INVALID_ARGUMENT;
    const pcm_tile_set *set = pcm_tiles(dtype);
    const pcm_exec exec = {0, threads, 0, 0, 0};
    double total = 0.0, sink = 0.0;

#pragma omp parallel num_threads(pcm_threads(&exec)) reduction(+ : total, sink)
    {
        /* Calibrate on a short run, then time one run of about `seconds`. */
        int64_t iterations = 1 << 16;
        double elapsed = 0.0;
        for (;;) {
            double start = omp_get_wtime();
            sink += set->fma_loop(iterations);
            elapsed = omp_get_wtime() - start;
            if (elapsed > 0.02 || iterations > ((int64_t)1 << 40))
                break;
            iterations *= 4;
        }
        iterations = (int64_t)((double)iterations * seconds / (elapsed > 0.0 ? elapsed : 1e-9));
        if (iterations < 1)
            iterations = 1;
#pragma omp barrier
        double start = omp_get_wtime();
        sink += set->fma_loop(iterations);
        elapsed = omp_get_wtime() - start;
        total += 2.0 * 16.0 * (double)set->vl * (double)iterations / (elapsed > 0.0 ? elapsed : 1e-9);
    }
    /* Storing the chains' sum keeps the compiler from dropping the loops. */
    volatile double keep = sink;
    (void)keep;
    *gflops_out = total / 1e9;
    return PCM_OK;
}

#define T float
#define SUFFIX f32
#define DTYPE PCM_FLOAT32
#define T_IS_DOUBLE 0
#include "conv2d_fast.inc"
#undef T
#undef SUFFIX
#undef DTYPE
#undef T_IS_DOUBLE

#define T double
#define SUFFIX f64
#define DTYPE PCM_FLOAT64
#define T_IS_DOUBLE 1
#include "conv2d_fast.inc"
#undef T
#undef SUFFIX
#undef DTYPE
#undef T_IS_DOUBLE
