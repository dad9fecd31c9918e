/* The "batch", "channels" and "hybrid" strategies run on a grid_batch x grid_channels grid of
 * ranks (batch: A x 1, channels: 1 x A for A active ranks). Rank bi * grid_channels + ci
 * computes the batch items pcm_band(n, grid_batch, bi) for the output channels
 * pcm_band(k, grid_channels, ci). The BATCH placement also runs here: each rank computes its
 * own slice.
 *
 * An output-channel range may cut groups: it is split into pieces that are either part of one
 * group or whole groups, and each piece is one local convolution on the input channels of its
 * groups. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

typedef struct grid_cell {
    int64_t n0, n1; /* batch items */
    int64_t k0, k1; /* output channels */
} grid_cell;

typedef struct piece {
    int64_t k0, k1;        /* output channels */
    int64_t group, groups; /* first group and group count */
} piece;

static void grid_shape(const pcm_mpi *ctx, int64_t *rows, int64_t *cols)
{
    switch (ctx->strategy) {
    case PCM_STRATEGY_BATCH: *rows = ctx->active; *cols = 1; break;
    case PCM_STRATEGY_CHANNELS: *rows = 1; *cols = ctx->active; break;
    default: *rows = ctx->grid_batch; *cols = ctx->grid_channels; break;
    }
}

static grid_cell cell_of(const pcm_mpi *ctx, int64_t rank)
{
    const pcm_conv_desc *g = &ctx->desc;
    int64_t rows, cols;
    grid_cell c;
    grid_shape(ctx, &rows, &cols);
    if (rank >= rows * cols) {
        c.n0 = c.n1 = g->n;
        c.k0 = c.k1 = g->k;
        return c;
    }
    pcm_row_band(g->n, rows, rank / cols, &c.n0, &c.n1);
    pcm_row_band(g->k, cols, rank % cols, &c.k0, &c.k1);
    return c;
}

/* Split output channels [k0, k1) into pieces; returns the count (at most 3). */
static int pieces_of(const pcm_conv_desc *g, int64_t k0, int64_t k1, piece *out)
{
    const int64_t kg = g->k / g->groups;
    int count = 0;
    for (int64_t k = k0; k < k1;) {
        const int64_t group = k / kg;
        int64_t end;
        if (k % kg != 0 || k1 - k < kg) {
            end = pcm_min64(k1, (group + 1) * kg);
            out[count++] = (piece){k, end, group, 1};
        } else {
            end = k + (k1 - k) / kg * kg;
            out[count++] = (piece){k, end, group, (end - k) / kg};
        }
        k = end;
    }
    return count;
}

static pcm_conv_desc piece_desc(const pcm_conv_desc *g, int64_t n, const piece *p)
{
    pcm_conv_desc d = *g;
    d.n = n;
    d.c = p->groups * (g->c / g->groups);
    d.k = p->k1 - p->k0;
    d.groups = p->groups;
    return d;
}

/* A sub-array view of channels [c0, c1) of a dense [n][channels][inner] block: a pointer into it
 * when contiguous, else a packed copy (*owned is then set and must be freed). */
static const void *channel_view(const pcm_mpi *ctx, const void *block, int64_t n,
                                int64_t channels, int64_t inner, int64_t c0, int64_t c1,
                                void **owned)
{
    *owned = NULL;
    if (n <= 1 || (c0 == 0 && c1 == channels))
        return (const char *)block + c0 * inner * ctx->esize;
    *owned = pcm_alloc_elements(ctx, n * (c1 - c0) * inner);
    if (*owned == NULL)
        return NULL;
    const int64_t count = n * (c1 - c0) * inner;
    pcm_block_copy(ctx, block, pcm_channel_block(0, n, channels, inner, c0, c1), *owned,
                   (pcm_block){0, 1, count, count});
    return *owned;
}

/* Where a piece writes channels [c0, c1) of a dense [n][channels][inner] result: straight into
 * it when contiguous, else into a buffer that flush_view copies back. */
static void *result_view(const pcm_mpi *ctx, void *block, int64_t n, int64_t channels,
                         int64_t inner, int64_t c0, int64_t c1, void **owned)
{
    *owned = NULL;
    if (n <= 1 || (c0 == 0 && c1 == channels))
        return (char *)block + c0 * inner * ctx->esize;
    *owned = pcm_alloc_elements(ctx, n * (c1 - c0) * inner);
    return *owned;
}

static void flush_view(const pcm_mpi *ctx, void *owned, void *block, int64_t n, int64_t channels,
                       int64_t inner, int64_t c0, int64_t c1)
{
    if (owned == NULL)
        return;
    const int64_t count = n * (c1 - c0) * inner;
    pcm_block_copy(ctx, owned, (pcm_block){0, 1, count, count}, block,
                   pcm_channel_block(0, n, channels, inner, c0, c1));
}

/* Forward of one cell: input [n][c][h][w] (all channels) to output [n][k1 - k0][oh][ow]. */
static pcm_status cell_forward(const pcm_mpi *ctx, const grid_cell *cell, const void *input,
                               const void *weight, const void *bias, void *output)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t n = cell->n1 - cell->n0, kc = cell->k1 - cell->k0, cg = g->c / g->groups;
    const int64_t hw = g->h * g->w, ohw = g->out_h * g->out_w, taps = cg * g->r * g->s;
    pcm_status status = PCM_OK;
    piece pieces[3];
    const int count = pieces_of(g, cell->k0, cell->k1, pieces);

    for (int i = 0; i < count && status == PCM_OK; ++i) {
        const piece *p = &pieces[i];
        pcm_conv_desc d = piece_desc(g, n, p);
        void *in_owned = NULL, *out_owned = NULL;
        const void *in = channel_view(ctx, input, n, g->c, hw, p->group * cg,
                                      (p->group + p->groups) * cg, &in_owned);
        void *out = result_view(ctx, output, n, kc, ohw, p->k0 - cell->k0, p->k1 - cell->k0,
                                &out_owned);
        if (in == NULL || out == NULL)
            status = PCM_ERR_OUT_OF_MEMORY;
        else
            status = pcm_local_forward(ctx, &d, in,
                                       (const char *)weight + p->k0 * taps * ctx->esize,
                                       bias ? (const char *)bias + p->k0 * ctx->esize : NULL, out);
        if (status == PCM_OK)
            flush_view(ctx, out_owned, output, n, kc, ohw, p->k0 - cell->k0, p->k1 - cell->k0);
        free(in_owned);
        free(out_owned);
    }
    return status;
}

/* Backward of one cell, with grad_output [n][k1 - k0][oh][ow]. grad_input [n][c][h][w] receives
 * the cell's contribution, and channels of groups outside the cell become zero. grad_weight and
 * grad_bias are full-size and receive rows [k0, k1). */
static pcm_status cell_backward(const pcm_mpi *ctx, const grid_cell *cell,
                                const void *grad_output, const void *input, const void *weight,
                                void *grad_input, void *grad_weight, void *grad_bias)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t n = cell->n1 - cell->n0, kc = cell->k1 - cell->k0, cg = g->c / g->groups;
    const int64_t hw = g->h * g->w, ohw = g->out_h * g->out_w, taps = cg * g->r * g->s;
    pcm_status status = PCM_OK;
    piece pieces[3];
    const int count = pieces_of(g, cell->k0, cell->k1, pieces);

    /* Pieces of one rank never share a group, so each writes its own channels; channels of
     * groups outside the cell must read as zero. */
    const int covers_all = count > 0 && pieces[0].group == 0 &&
                           pieces[count - 1].group + pieces[count - 1].groups == g->groups;
    if (grad_input != NULL && !covers_all)
        memset(grad_input, 0, (size_t)(n * g->c * hw) * ctx->esize);

    for (int i = 0; i < count && status == PCM_OK; ++i) {
        const piece *p = &pieces[i];
        pcm_conv_desc d = piece_desc(g, n, p);
        const int64_t c0 = p->group * cg, c1 = (p->group + p->groups) * cg;
        void *go_owned = NULL, *in_owned = NULL, *gi_owned = NULL;
        const void *go = channel_view(ctx, grad_output, n, kc, ohw, p->k0 - cell->k0,
                                      p->k1 - cell->k0, &go_owned);
        const void *in = NULL;
        void *gi = NULL;
        if (go == NULL)
            status = PCM_ERR_OUT_OF_MEMORY;

        if (status == PCM_OK && grad_input != NULL) {
            gi = result_view(ctx, grad_input, n, g->c, hw, c0, c1, &gi_owned);
            if (gi == NULL)
                status = PCM_ERR_OUT_OF_MEMORY;
            else
                status = pcm_local_backward_data(ctx, &d, go,
                                                 (const char *)weight + p->k0 * taps * ctx->esize,
                                                 gi);
            if (status == PCM_OK)
                flush_view(ctx, gi_owned, grad_input, n, g->c, hw, c0, c1);
        }
        if (status == PCM_OK && (grad_weight != NULL || grad_bias != NULL)) {
            /* The bias gradient reads grad_output alone. */
            if (grad_weight != NULL)
                in = channel_view(ctx, input, n, g->c, hw, c0, c1, &in_owned);
            if (grad_weight != NULL && in == NULL)
                status = PCM_ERR_OUT_OF_MEMORY;
            else
                status = pcm_local_backward_weight(
                    ctx, &d, go, in,
                    grad_weight ? (char *)grad_weight + p->k0 * taps * ctx->esize : NULL,
                    grad_bias ? (char *)grad_bias + p->k0 * ctx->esize : NULL);
        }
        free(go_owned);
        free(in_owned);
        free(gi_owned);
    }
    return status;
}

/* Gather every rank's cell of a [n][channels][inner] array into output on rank 0, or on every
 * rank when to_all. This rank's cell is read from dense cell_data, or from output itself when
 * in_place. With by_channel == 0 a cell spans all channels of its batch slice. */
static pcm_status gather_cells(const pcm_mpi *ctx, const void *cell_data, int in_place,
                               void *output, int64_t channels, int64_t inner, int by_channel,
                               int to_all)
{
    const grid_cell own = cell_of(ctx, ctx->rank);
    const int receives = to_all || ctx->rank == 0;
    pcm_status status = PCM_OK;
    pcm_traffic t;

    PCM_TRY(pcm_traffic_init(&t, 2 * ctx->size));
    const pcm_block own_box = pcm_channel_block(own.n0, own.n1, channels, inner,
                                                by_channel ? own.k0 : 0,
                                                by_channel ? own.k1 : channels);
    const int64_t own_count = pcm_block_elements(own_box);
    const pcm_block own_dense = {0, 1, own_count, own_count};
    const void *source = in_place ? output : cell_data;
    const pcm_block source_block = in_place ? own_box : own_dense;

    for (int peer = 0; peer < ctx->size; ++peer) {
        if (peer == ctx->rank) {
            if (receives && !in_place)
                pcm_block_copy(ctx, cell_data, own_dense, output, own_box);
            continue;
        }
        const grid_cell other = cell_of(ctx, peer);
        if (to_all || peer == 0)
            PCM_TRY(pcm_traffic_send(&t, ctx, peer, TAG_GATHER, source, source_block));
        if (receives)
            PCM_TRY(pcm_traffic_recv(&t, ctx, peer, TAG_GATHER, output,
                                     pcm_channel_block(other.n0, other.n1, channels, inner,
                                                       by_channel ? other.k0 : 0,
                                                       by_channel ? other.k1 : channels)));
    }
    PCM_TRY(pcm_traffic_start(&t, ctx));
    PCM_TRY(pcm_traffic_wait(&t));
cleanup:
    pcm_traffic_free(&t);
    return status;
}

/* ROOT placement with several grid columns: every rank's partial grad_input of its batch slice
 * (dense [n1 - n0][c][h][w]) is added on rank 0, one rank after the other, into grad_input,
 * which already contains rank 0's own part. */
static pcm_status sum_cells_on_root(const pcm_mpi *ctx, const void *partial, void *grad_input,
                                    int64_t chw)
{
    pcm_status status = PCM_OK;
    void *arrived = NULL;
    pcm_traffic t;

    PCM_TRY(pcm_traffic_init(&t, 1));
    if (ctx->rank != 0) {
        const grid_cell own = cell_of(ctx, ctx->rank);
        const int64_t count = (own.n1 - own.n0) * chw;
        PCM_TRY(pcm_traffic_send(&t, ctx, 0, TAG_GATHER_INPUT, partial,
                                 (pcm_block){0, 1, count, count}));
        PCM_TRY(pcm_traffic_start(&t, ctx));
        PCM_TRY(pcm_traffic_wait(&t));
        goto cleanup;
    }
    int64_t largest = 0;
    for (int peer = 1; peer < ctx->size; ++peer) {
        const grid_cell other = cell_of(ctx, peer);
        largest = pcm_max64(largest, (other.n1 - other.n0) * chw);
    }
    arrived = pcm_alloc_elements(ctx, largest);
    if (arrived == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }
    for (int peer = 1; peer < ctx->size; ++peer) {
        const grid_cell other = cell_of(ctx, peer);
        const int64_t count = (other.n1 - other.n0) * chw;
        t.n_recvs = 0;
        PCM_TRY(pcm_traffic_recv(&t, ctx, peer, TAG_GATHER_INPUT, arrived,
                                 (pcm_block){0, 1, count, count}));
        PCM_TRY(pcm_traffic_start(&t, ctx));
        PCM_TRY(pcm_traffic_wait(&t));
        pcm_block_add(ctx, arrived, (pcm_block){0, 1, count, count}, grad_input,
                      (pcm_block){other.n0 * chw, 1, count, count});
    }
cleanup:
    pcm_traffic_free(&t);
    free(arrived);
    return status;
}

/* Limitation: boxes that several ranks share (the whole input under the channels strategy) are
 * sent once per rank from rank 0, not along a broadcast tree. */
static pcm_status scatter_cells(const pcm_mpi *ctx, const void *global, int64_t channels,
                                int64_t inner, int by_channel, void **dest, void **owned)
{
    const grid_cell own = cell_of(ctx, ctx->rank);
    pcm_status status = PCM_OK;
    pcm_traffic t;

    *owned = NULL;
    PCM_TRY(pcm_traffic_init(&t, ctx->size));
    const int64_t c0 = by_channel ? own.k0 : 0, c1 = by_channel ? own.k1 : channels;
    const pcm_block own_box = pcm_channel_block(own.n0, own.n1, channels, inner, c0, c1);
    const int64_t count = pcm_block_elements(own_box);
    if (ctx->rank == 0 && (own_box.count <= 1 || own_box.length == own_box.stride)) {
        *dest = (char *)global + own_box.offset * ctx->esize;
    } else {
        *dest = *owned = pcm_alloc_elements(ctx, count);
        if (*owned == NULL) {
            status = PCM_ERR_OUT_OF_MEMORY;
            goto cleanup;
        }
        if (ctx->rank == 0)
            pcm_block_copy(ctx, global, own_box, *owned, (pcm_block){0, 1, count, count});
    }
    if (ctx->rank == 0) {
        for (int peer = 1; peer < ctx->size; ++peer) {
            const grid_cell other = cell_of(ctx, peer);
            PCM_TRY(pcm_traffic_send(&t, ctx, peer, TAG_SCATTER, global,
                                     pcm_channel_block(other.n0, other.n1, channels, inner,
                                                       by_channel ? other.k0 : 0,
                                                       by_channel ? other.k1 : channels)));
        }
    } else {
        PCM_TRY(pcm_traffic_recv(&t, ctx, 0, TAG_SCATTER, *dest, (pcm_block){0, 1, count, count}));
    }
    PCM_TRY(pcm_traffic_start(&t, ctx));
    PCM_TRY(pcm_traffic_wait(&t));
cleanup:
    pcm_traffic_free(&t);
    return status;
}

pcm_status pcm_grid_forward(const pcm_mpi *ctx, const void *input, const void *weight,
                            const void *bias, void *output)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t chw = g->c * g->h * g->w, ohw = g->out_h * g->out_w;
    pcm_status status = PCM_OK;
    void *in_owned = NULL, *out_owned = NULL, *w_owned = NULL, *b_owned = NULL;
    void *w = (void *)weight, *b = (void *)bias, *in = NULL, *out = NULL;

    if (ctx->placement == PCM_PLACEMENT_BATCH) {
        pcm_conv_desc d = *g;
        d.n = ctx->batch_start[ctx->rank + 1] - ctx->batch_start[ctx->rank];
        return pcm_local_forward(ctx, &d, input, weight, bias, output);
    }

    const grid_cell own = cell_of(ctx, ctx->rank);
    const int64_t cell_count = (own.n1 - own.n0) * (own.k1 - own.k0) * ohw;
    /* A cell with every output channel is contiguous in the output. */
    const int in_place = own.k0 == 0 && own.k1 == g->k &&
                         (ctx->placement == PCM_PLACEMENT_REPLICATED || ctx->rank == 0);

    if (ctx->placement == PCM_PLACEMENT_REPLICATED) {
        in = (char *)input + own.n0 * chw * ctx->esize;
    } else {
        PCM_TRY(pcm_broadcast_parameters(ctx, weight, bias, &w, &b, &w_owned, &b_owned));
        PCM_TRY(scatter_cells(ctx, input, g->c, g->h * g->w, 0, &in, &in_owned));
    }
    if (in_place) {
        out = (char *)output + own.n0 * g->k * ohw * ctx->esize;
    } else {
        out = out_owned = pcm_alloc_elements(ctx, cell_count);
        if (out == NULL) {
            status = PCM_ERR_OUT_OF_MEMORY;
            goto cleanup;
        }
    }
    PCM_TRY(cell_forward(ctx, &own, in, w, b, out));
    PCM_TRY(gather_cells(ctx, out, in_place, output, g->k, ohw, 1,
                         ctx->placement == PCM_PLACEMENT_REPLICATED));
cleanup:
    free(in_owned);
    free(out_owned);
    free(w_owned);
    free(b_owned);
    return status;
}

pcm_status pcm_grid_backward(const pcm_mpi *ctx, const void *grad_output, const void *input,
                             const void *weight, void *grad_input, void *grad_weight,
                             void *grad_bias)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t chw = g->c * g->h * g->w, ohw = g->out_h * g->out_w;
    const int64_t wsize = pcm_weight_elements(g);
    const int root = ctx->placement == PCM_PLACEMENT_ROOT;
    const int need_input = ctx->need & PCM_NEED_INPUT;
    const int need_weight = ctx->need & PCM_NEED_WEIGHT, need_bias = ctx->need & PCM_NEED_BIAS;
    pcm_status status = PCM_OK;
    void *go_owned = NULL, *in_owned = NULL, *w_owned = NULL, *gw_owned = NULL,
         *gb_owned = NULL, *gi_owned = NULL;
    void *go = NULL, *in = NULL, *w = (void *)weight, *gi = NULL;
    void *gw = need_weight ? grad_weight : NULL, *gb = need_bias ? grad_bias : NULL;

    if (ctx->placement == PCM_PLACEMENT_BATCH) {
        pcm_conv_desc d = *g;
        d.n = ctx->batch_start[ctx->rank + 1] - ctx->batch_start[ctx->rank];
        if (need_input)
            PCM_TRY(pcm_local_backward_data(ctx, &d, grad_output, weight, grad_input));
        PCM_TRY(pcm_local_backward_weight(ctx, &d, grad_output, input, gw, gb));
        if (gw != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gw, wsize, 0));
        if (gb != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gb, g->k, 0));
        return status;
    }

    const grid_cell own = cell_of(ctx, ctx->rank);
    const int64_t n = own.n1 - own.n0;
    int64_t rows, cols;
    grid_shape(ctx, &rows, &cols);

    /* Operands of the cell. */
    if (!root) {
        in = (char *)input + own.n0 * chw * ctx->esize;
        go = (void *)channel_view(ctx, (const char *)grad_output + own.n0 * g->k * ohw * ctx->esize,
                                  n, g->k, ohw, own.k0, own.k1, &go_owned);
        if (go == NULL) {
            status = PCM_ERR_OUT_OF_MEMORY;
            goto cleanup;
        }
    } else {
        if (need_input) {
            if (ctx->rank != 0) {
                w = w_owned = pcm_alloc_elements(ctx, wsize);
                if (w == NULL) {
                    status = PCM_ERR_OUT_OF_MEMORY;
                    goto cleanup;
                }
            }
            PCM_TRY(pcm_bcast(ctx, w, wsize));
        }
        PCM_TRY(scatter_cells(ctx, grad_output, g->k, ohw, 1, &go, &go_owned));
        if (need_weight)
            PCM_TRY(scatter_cells(ctx, input, g->c, g->h * g->w, 0, &in, &in_owned));
        if (ctx->rank != 0) {
            gw = need_weight ? (gw_owned = pcm_alloc_elements(ctx, wsize)) : NULL;
            gb = need_bias ? (gb_owned = pcm_alloc_elements(ctx, g->k)) : NULL;
            if ((need_weight && gw == NULL) || (need_bias && gb == NULL)) {
                status = PCM_ERR_OUT_OF_MEMORY;
                goto cleanup;
            }
        }
    }

    /* grad_input: the cell's share lands in the caller's array when this rank's rows are
     * the final result there (one column of the grid), else it is summed over the grid row. */
    if (need_input) {
        if (!root) {
            memset(grad_input, 0, (size_t)(cols > 1 ? g->n * chw : 0) * ctx->esize);
            gi = (char *)grad_input + own.n0 * chw * ctx->esize;
        } else if (ctx->rank == 0) {
            memset(grad_input, 0, (size_t)(g->n * chw) * ctx->esize);
            gi = (char *)grad_input + own.n0 * chw * ctx->esize;
        } else {
            gi = gi_owned = pcm_alloc_elements(ctx, n * chw);
            if (gi == NULL) {
                status = PCM_ERR_OUT_OF_MEMORY;
                goto cleanup;
            }
        }
    }
    if (gw != NULL)
        memset(gw, 0, (size_t)wsize * ctx->esize);
    if (gb != NULL)
        memset(gb, 0, (size_t)g->k * ctx->esize);

    PCM_TRY(cell_backward(ctx, &own, go, in, w, need_input ? gi : NULL, gw, gb));

    if (gw != NULL)
        PCM_TRY(pcm_sum_identical(ctx, gw, wsize, root));
    if (gb != NULL)
        PCM_TRY(pcm_sum_identical(ctx, gb, g->k, root));
    if (!need_input)
        goto cleanup;
    if (!root) {
        /* One grid column: cells hold disjoint batch slices, gathered like the output. Several
         * columns: every rank has partial sums over its channels, summed everywhere.
         * Limitation: that sum moves the whole grad_input from every rank, grid_batch times the
         * traffic of a sum within each grid row; correct, but slower for tall hybrid grids. */
        if (cols > 1)
            PCM_TRY(pcm_sum_identical(ctx, grad_input, g->n * chw, 0));
        else
            PCM_TRY(gather_cells(ctx, NULL, 1, grad_input, g->c, g->h * g->w, 0, 1));
    } else if (cols > 1) {
        PCM_TRY(sum_cells_on_root(ctx, gi, grad_input, chw));
    } else {
        PCM_TRY(gather_cells(ctx, gi, ctx->rank == 0, grad_input, g->c, g->h * g->w, 0, 0));
    }
cleanup:
    free(go_owned);
    free(in_owned);
    free(w_owned);
    free(gw_owned);
    free(gb_owned);
    free(gi_owned);
    return status;
}
