/* The "rows" strategy for every placement. ROWS runs on the caller's bands. ROOT scatters bands
 * from rank 0, runs the band code and gathers the result. REPLICATED needs no halos because
 * every rank has the whole input, so each rank computes its band directly and the bands are
 * gathered on every rank. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

/* Rank 0 sends each active rank its band of rows of global [planes][rows][width]. */
static pcm_status scatter_rows(const pcm_mpi *ctx, const void *global, int64_t planes,
                               int64_t rows, int64_t width, void *band, int tag)
{
    pcm_status status = PCM_OK;
    pcm_traffic t;
    int64_t p, q;

    PCM_TRY(pcm_traffic_init(&t, ctx->size));
    pcm_band(rows, ctx->active, ctx->rank, &p, &q);
    const pcm_block own = {0, 1, planes * (q - p) * width, planes * (q - p) * width};
    if (ctx->rank == 0) {
        for (int peer = 0; peer < ctx->size; ++peer) {
            int64_t pp, pq;
            pcm_band(rows, ctx->active, peer, &pp, &pq);
            pcm_block block = pcm_rows_block(planes, rows, width, 0, pp, pq);
            if (peer == 0)
                pcm_block_copy(ctx, global, block, band, own);
            else
                PCM_TRY(pcm_traffic_send(&t, ctx, peer, tag, global, block));
        }
    } else {
        PCM_TRY(pcm_traffic_recv(&t, ctx, 0, tag, band, own));
    }
    PCM_TRY(pcm_traffic_start(&t, ctx));
    PCM_TRY(pcm_traffic_wait(&t));
cleanup:
    pcm_traffic_free(&t);
    return status;
}

/* Every rank sends its band to rank 0 (or to every rank when to_all), which places the bands
 * into global [planes][rows][width]. */
static pcm_status gather_rows(const pcm_mpi *ctx, const void *band, int64_t planes,
                              int64_t rows, int64_t width, void *global, int to_all, int tag)
{
    pcm_status status = PCM_OK;
    pcm_traffic t;
    int64_t p, q;

    PCM_TRY(pcm_traffic_init(&t, 2 * ctx->size));
    pcm_band(rows, ctx->active, ctx->rank, &p, &q);
    const pcm_block own = {0, 1, planes * (q - p) * width, planes * (q - p) * width};
    const int receives = to_all || ctx->rank == 0;
    for (int peer = 0; peer < ctx->size; ++peer) {
        int64_t pp, pq;
        pcm_band(rows, ctx->active, peer, &pp, &pq);
        if (peer == ctx->rank) {
            if (receives)
                pcm_block_copy(ctx, band, own, global,
                               pcm_rows_block(planes, rows, width, 0, p, q));
            continue;
        }
        if (to_all || peer == 0)
            PCM_TRY(pcm_traffic_send(&t, ctx, peer, tag, band, own));
        if (receives)
            PCM_TRY(pcm_traffic_recv(&t, ctx, peer, tag, global,
                                     pcm_rows_block(planes, rows, width, 0, pp, pq)));
    }
    PCM_TRY(pcm_traffic_start(&t, ctx));
    PCM_TRY(pcm_traffic_wait(&t));
cleanup:
    pcm_traffic_free(&t);
    return status;
}

pcm_status pcm_rows_forward(const pcm_mpi *ctx, const void *input, const void *weight,
                            const void *bias, void *output)
{
    const pcm_conv_desc *g = &ctx->desc;
    pcm_status status = PCM_OK;
    void *in_band = NULL, *out_band = NULL, *owned_weight = NULL, *owned_bias = NULL;
    void *w = (void *)weight, *b = (void *)bias;
    int64_t p, q, y0, y1;

    if (ctx->placement == PCM_PLACEMENT_ROWS)
        return pcm_rows_forward_band(ctx, input, weight, bias, output);

    pcm_band(g->h, ctx->active, ctx->rank, &p, &q);
    pcm_band(g->out_h, ctx->active, ctx->rank, &y0, &y1);
    out_band = pcm_alloc_elements(ctx, g->n * g->k * (y1 - y0) * g->out_w);
    if (out_band == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }

    if (ctx->placement == PCM_PLACEMENT_REPLICATED) {
        pcm_conv_desc d = pcm_window_desc(g, g->n, 0, g->h, y0, y1);
        PCM_TRY(pcm_local_forward(ctx, &d, input, weight, bias, out_band));
        PCM_TRY(gather_rows(ctx, out_band, g->n * g->k, g->out_h, g->out_w, output, 1,
                            TAG_GATHER));
        goto cleanup;
    }

    /* ROOT */
    PCM_TRY(pcm_broadcast_parameters(ctx, weight, bias, &w, &b, &owned_weight, &owned_bias));
    in_band = pcm_alloc_elements(ctx, g->n * g->c * (q - p) * g->w);
    if (in_band == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }
    PCM_TRY(scatter_rows(ctx, input, g->n * g->c, g->h, g->w, in_band, TAG_SCATTER));
    PCM_TRY(pcm_rows_forward_band(ctx, in_band, w, b, out_band));
    PCM_TRY(gather_rows(ctx, out_band, g->n * g->k, g->out_h, g->out_w, output, 0, TAG_GATHER));
cleanup:
    free(in_band);
    free(out_band);
    free(owned_weight);
    free(owned_bias);
    return status;
}

/* REPLICATED: grad_input by input band from the whole grad_output, weight gradients by output
 * band from the whole input. */
static pcm_status replicated_backward(const pcm_mpi *ctx, const void *grad_output,
                                      const void *input, const void *weight, void *grad_input,
                                      void *grad_weight, void *grad_bias)
{
    const pcm_conv_desc *g = &ctx->desc;
    pcm_status status = PCM_OK;
    void *band = NULL;
    int64_t p, q, y0, y1;

    pcm_band(g->h, ctx->active, ctx->rank, &p, &q);
    pcm_band(g->out_h, ctx->active, ctx->rank, &y0, &y1);

    if (ctx->need & PCM_NEED_INPUT) {
        band = pcm_alloc_elements(ctx, g->n * g->c * (q - p) * g->w);
        if (band == NULL)
            return PCM_ERR_OUT_OF_MEMORY;
        pcm_conv_desc d = pcm_window_desc(g, g->n, p, q, 0, g->out_h);
        PCM_TRY(pcm_local_backward_data(ctx, &d, grad_output, weight, band));
        PCM_TRY(gather_rows(ctx, band, g->n * g->c, g->h, g->w, grad_input, 1,
                            TAG_GATHER_INPUT));
        free(band);
        band = NULL;
    }
    if (ctx->need & (PCM_NEED_WEIGHT | PCM_NEED_BIAS)) {
        void *gw = (ctx->need & PCM_NEED_WEIGHT) ? grad_weight : NULL;
        void *gb = (ctx->need & PCM_NEED_BIAS) ? grad_bias : NULL;
        const int64_t planes = g->n * g->k;
        band = pcm_alloc_elements(ctx, planes * (y1 - y0) * g->out_w);
        if (band == NULL)
            return PCM_ERR_OUT_OF_MEMORY;
        pcm_block own = {0, 1, planes * (y1 - y0) * g->out_w, planes * (y1 - y0) * g->out_w};
        pcm_block_copy(ctx, grad_output, pcm_rows_block(planes, g->out_h, g->out_w, 0, y0, y1),
                       band, own);
        pcm_conv_desc d = pcm_window_desc(g, g->n, 0, g->h, y0, y1);
        PCM_TRY(pcm_local_backward_weight(ctx, &d, band, input, gw, gb));
        if (gw != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gw, pcm_weight_elements(g), 0));
        if (gb != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gb, g->k, 0));
    }
cleanup:
    free(band);
    return status;
}

pcm_status pcm_rows_backward(const pcm_mpi *ctx, const void *grad_output, const void *input,
                             const void *weight, void *grad_input, void *grad_weight,
                             void *grad_bias)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t wsize = pcm_weight_elements(g);
    pcm_status status = PCM_OK;
    void *go_band = NULL, *in_band = NULL, *gi_band = NULL, *w = NULL;
    void *gw = grad_weight, *gb = grad_bias, *owned_gw = NULL, *owned_gb = NULL;
    int64_t p, q, y0, y1;

    if (ctx->placement == PCM_PLACEMENT_ROWS)
        return pcm_rows_backward_band(ctx, grad_output, input, weight, grad_input, grad_weight,
                                      grad_bias, 0);
    if (ctx->placement == PCM_PLACEMENT_REPLICATED)
        return replicated_backward(ctx, grad_output, input, weight, grad_input, grad_weight,
                                   grad_bias);

    /* ROOT */
    pcm_band(g->h, ctx->active, ctx->rank, &p, &q);
    pcm_band(g->out_h, ctx->active, ctx->rank, &y0, &y1);
    const int64_t in_count = g->n * g->c * (q - p) * g->w;
    go_band = pcm_alloc_elements(ctx, g->n * g->k * (y1 - y0) * g->out_w);
    in_band = pcm_alloc_elements(ctx, (ctx->need & PCM_NEED_WEIGHT) ? in_count : 0);
    gi_band = pcm_alloc_elements(ctx, (ctx->need & PCM_NEED_INPUT) ? in_count : 0);
    w = ctx->rank == 0 ? NULL : pcm_alloc_elements(ctx, wsize);
    if (ctx->rank != 0) {
        gw = owned_gw = pcm_alloc_elements(ctx, wsize);
        gb = owned_gb = pcm_alloc_elements(ctx, g->k);
    }
    if (go_band == NULL || in_band == NULL || gi_band == NULL ||
        (ctx->rank != 0 && (w == NULL || owned_gw == NULL || owned_gb == NULL))) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }

    const void *weight_used = ctx->rank == 0 ? weight : w;
    if (ctx->need & PCM_NEED_INPUT)
        PCM_TRY(pcm_bcast(ctx, (void *)weight_used, wsize));
    PCM_TRY(scatter_rows(ctx, grad_output, g->n * g->k, g->out_h, g->out_w, go_band,
                         TAG_SCATTER_GRAD));
    if (ctx->need & PCM_NEED_WEIGHT)
        PCM_TRY(scatter_rows(ctx, input, g->n * g->c, g->h, g->w, in_band, TAG_SCATTER));
    PCM_TRY(pcm_rows_backward_band(ctx, go_band, in_band, weight_used, gi_band, gw, gb, 1));
    if (ctx->need & PCM_NEED_INPUT)
        PCM_TRY(gather_rows(ctx, gi_band, g->n * g->c, g->h, g->w, grad_input, 0,
                            TAG_GATHER_INPUT));
cleanup:
    free(go_band);
    free(in_band);
    free(gi_band);
    free(w);
    free(owned_gw);
    free(owned_gb);
    return status;
}
