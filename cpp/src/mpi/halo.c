/* Row decomposition with halos: each rank owns a band of input rows and a band of output rows
 * (pcm_band over the active ranks). The rows an output band reads split into three parts:
 * those in the rank's own input band, those above it and those below it. By linearity the
 * output is the sum of one convolution per part, each reading its part alone (rows outside
 * read as zero), so:
 * - forward: the own part is computed straight from the caller's band while the halos travel,
 *   then the halo parts are added to the border rows they reach;
 * - backward data: the contributions of a band's gradient to halo rows are computed first and
 *   sent to the ranks owning those rows, which add them to their own part;
 * - backward weight: the own part and both halo parts are summed, then summed over ranks.
 * Halos may come from several ranks (bands thinner than the receptive field) and may lie far
 * from the own band (strides). Every rank derives every other rank's needs from the global
 * geometry, so nothing is negotiated at run time. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

/* Bands, needs and halos of one rank. */
typedef struct rows_layout {
    int64_t p, q;             /* own input rows */
    int64_t y0, y1;           /* own output rows */
    int64_t a, b;             /* input rows the output band reads */
    int64_t above0, above1;   /* needed rows above the own band */
    int64_t below0, below1;   /* needed rows below the own band */
} rows_layout;

static int64_t ceil_div(int64_t a, int64_t b) { return -pcm_floor_div(-a, b); }

static rows_layout layout_of(const pcm_mpi *ctx, int64_t rank)
{
    const pcm_conv_desc *g = &ctx->desc;
    rows_layout l;
    pcm_band(g->h, ctx->active, rank, &l.p, &l.q);
    pcm_band(g->out_h, ctx->active, rank, &l.y0, &l.y1);
    pcm_rows_needed(g, l.y0, l.y1, &l.a, &l.b);
    l.above0 = l.a;
    l.above1 = pcm_max64(l.a, pcm_min64(l.b, l.p));
    l.below0 = pcm_min64(l.b, pcm_max64(l.a, l.q));
    l.below1 = l.b;
    return l;
}

/* Output rows of [y0, y1) that read an input row above p, and those that read one at or
 * below q (as [*lo, *hi) ranges). */
static void rows_reading_above(const pcm_conv_desc *g, const rows_layout *l, int64_t *hi)
{
    *hi = pcm_min64(l->y1, pcm_max64(l->y0, ceil_div(l->p + g->pad_top, g->stride_h)));
}

static void rows_reading_below(const pcm_conv_desc *g, const rows_layout *l, int64_t *lo)
{
    const int64_t span = g->dilation_h * (g->r - 1) + 1;
    *lo = pcm_max64(l->y0,
                    pcm_min64(l->y1, pcm_floor_div(l->q + g->pad_top - span, g->stride_h) + 1));
}

static void intersect(int64_t a0, int64_t a1, int64_t b0, int64_t b1, int64_t *lo, int64_t *hi)
{
    *lo = pcm_max64(a0, b0);
    *hi = pcm_max64(*lo, pcm_min64(a1, b1));
}

/* Queue the input halo exchange: this rank's band rows that others need, and its own halos. */
static pcm_status queue_input_halos(const pcm_mpi *ctx, const rows_layout *own,
                                    const void *input_band, void *above, void *below,
                                    pcm_traffic *t)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t planes = g->n * g->c, w = g->w;
    pcm_status status = PCM_OK;
    int64_t lo, hi;

    for (int peer = 0; peer < ctx->size; ++peer) {
        if (peer == ctx->rank)
            continue;
        rows_layout other = layout_of(ctx, peer);

        intersect(other.above0, other.above1, own->p, own->q, &lo, &hi);
        PCM_TRY(pcm_traffic_send(t, ctx, peer, TAG_HALO_ABOVE, input_band,
                                 pcm_rows_block(planes, own->q - own->p, w, own->p, lo, hi)));
        intersect(other.below0, other.below1, own->p, own->q, &lo, &hi);
        PCM_TRY(pcm_traffic_send(t, ctx, peer, TAG_HALO_BELOW, input_band,
                                 pcm_rows_block(planes, own->q - own->p, w, own->p, lo, hi)));

        intersect(own->above0, own->above1, other.p, other.q, &lo, &hi);
        PCM_TRY(pcm_traffic_recv(t, ctx, peer, TAG_HALO_ABOVE, above,
                                 pcm_rows_block(planes, own->above1 - own->above0, w,
                                                own->above0, lo, hi)));
        intersect(own->below0, own->below1, other.p, other.q, &lo, &hi);
        PCM_TRY(pcm_traffic_recv(t, ctx, peer, TAG_HALO_BELOW, below,
                                 pcm_rows_block(planes, own->below1 - own->below0, w,
                                                own->below0, lo, hi)));
    }
cleanup:
    return status;
}

/* Forward of one halo part: output rows [y0, y1) from input rows [u, v) alone, added into the
 * output band. */
static pcm_status add_halo_forward(const pcm_mpi *ctx, const rows_layout *l, const void *halo,
                                   int64_t u, int64_t v, int64_t y0, int64_t y1,
                                   const void *weight, void *output_band)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t planes = g->n * g->k, rows = y1 - y0;
    pcm_status status = PCM_OK;
    void *part = NULL;

    if (v <= u || y1 <= y0 || planes == 0)
        return PCM_OK;
    pcm_conv_desc d = pcm_window_desc(g, g->n, u, v, y0, y1);
    part = pcm_alloc_elements(ctx, pcm_output_elements(&d));
    if (part == NULL)
        return PCM_ERR_OUT_OF_MEMORY;
    PCM_TRY(pcm_local_forward(ctx, &d, halo, weight, NULL, part));
    pcm_block from = {0, planes, rows * g->out_w, rows * g->out_w};
    pcm_block_add(ctx, part, from, output_band,
                  pcm_rows_block(planes, l->y1 - l->y0, g->out_w, l->y0, y0, y1));
cleanup:
    free(part);
    return status;
}

pcm_status pcm_rows_forward_band(const pcm_mpi *ctx, const void *input_band, const void *weight,
                                 const void *bias, void *output_band)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t planes = g->n * g->c;
    const rows_layout l = layout_of(ctx, ctx->rank);
    pcm_status status = PCM_OK;
    pcm_traffic t;
    void *above = pcm_alloc_elements(ctx, planes * (l.above1 - l.above0) * g->w);
    void *below = pcm_alloc_elements(ctx, planes * (l.below1 - l.below0) * g->w);
    int64_t hi_above, lo_below;

    PCM_TRY(pcm_traffic_init(&t, 4 * ctx->size));
    if (above == NULL || below == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }
    PCM_TRY(queue_input_halos(ctx, &l, input_band, above, below, &t));
    PCM_TRY(pcm_traffic_start(&t, ctx));

    /* The own part overlaps the halo traffic. */
    pcm_conv_desc own = pcm_window_desc(g, g->n, l.p, l.q, l.y0, l.y1);
    status = pcm_local_forward(ctx, &own, input_band, weight, bias, output_band);
    pcm_status waited = pcm_traffic_wait(&t);
    if (status == PCM_OK)
        status = waited;
    if (status != PCM_OK)
        goto cleanup;

    rows_reading_above(g, &l, &hi_above);
    rows_reading_below(g, &l, &lo_below);
    PCM_TRY(add_halo_forward(ctx, &l, above, l.above0, l.above1, l.y0, hi_above, weight,
                             output_band));
    PCM_TRY(add_halo_forward(ctx, &l, below, l.below0, l.below1, lo_below, l.y1, weight,
                             output_band));
cleanup:
    pcm_traffic_free(&t);
    free(above);
    free(below);
    return status;
}

/* Backward data: contributions to the halo rows travel to their owners, which add them. */
static pcm_status backward_data_band(const pcm_mpi *ctx, const rows_layout *l,
                                     const void *grad_output_band, const void *weight,
                                     void *grad_input_band)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t planes = g->n * g->c, w = g->w;
    const int64_t rows_above = l->above1 - l->above0, rows_below = l->below1 - l->below0;
    pcm_status status = PCM_OK;
    pcm_traffic t;
    void *above = pcm_alloc_elements(ctx, planes * rows_above * w);
    void *below = pcm_alloc_elements(ctx, planes * rows_below * w);
    void *arrived = NULL;
    int64_t *arrived_rows = malloc(4 * (size_t)ctx->size * sizeof(int64_t));
    int64_t lo, hi, total = 0;

    PCM_TRY(pcm_traffic_init(&t, 4 * ctx->size));
    if (above == NULL || below == NULL || arrived_rows == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }

    pcm_conv_desc d = pcm_window_desc(g, g->n, l->above0, l->above1, l->y0, l->y1);
    PCM_TRY(pcm_local_backward_data(ctx, &d, grad_output_band, weight, above));
    d = pcm_window_desc(g, g->n, l->below0, l->below1, l->y0, l->y1);
    PCM_TRY(pcm_local_backward_data(ctx, &d, grad_output_band, weight, below));

    /* Rows [lo, hi) of this band that each peer's halo contributions cover, in peer order. */
    for (int peer = 0; peer < ctx->size; ++peer) {
        rows_layout other = peer == ctx->rank ? *l : layout_of(ctx, peer);
        intersect(other.above0, other.above1, l->p, l->q, &arrived_rows[4 * peer],
                  &arrived_rows[4 * peer + 1]);
        intersect(other.below0, other.below1, l->p, l->q, &arrived_rows[4 * peer + 2],
                  &arrived_rows[4 * peer + 3]);
        if (peer != ctx->rank)
            total += arrived_rows[4 * peer + 1] - arrived_rows[4 * peer] +
                     arrived_rows[4 * peer + 3] - arrived_rows[4 * peer + 2];
    }
    arrived = pcm_alloc_elements(ctx, total * planes * w);
    if (arrived == NULL) {
        status = PCM_ERR_OUT_OF_MEMORY;
        goto cleanup;
    }

    int64_t offset = 0;
    for (int peer = 0; peer < ctx->size; ++peer) {
        if (peer == ctx->rank)
            continue;
        rows_layout other = layout_of(ctx, peer);
        intersect(l->above0, l->above1, other.p, other.q, &lo, &hi);
        PCM_TRY(pcm_traffic_send(&t, ctx, peer, TAG_GRAD_ABOVE, above,
                                 pcm_rows_block(planes, rows_above, w, l->above0, lo, hi)));
        intersect(l->below0, l->below1, other.p, other.q, &lo, &hi);
        PCM_TRY(pcm_traffic_send(&t, ctx, peer, TAG_GRAD_BELOW, below,
                                 pcm_rows_block(planes, rows_below, w, l->below0, lo, hi)));
        for (int part = 0; part < 2; ++part) {
            lo = arrived_rows[4 * peer + 2 * part];
            hi = arrived_rows[4 * peer + 2 * part + 1];
            pcm_block into = {offset, 1, planes * (hi - lo) * w, planes * (hi - lo) * w};
            PCM_TRY(pcm_traffic_recv(&t, ctx, peer, part == 0 ? TAG_GRAD_ABOVE : TAG_GRAD_BELOW,
                                     arrived, into));
            offset += planes * (hi - lo) * w;
        }
    }
    PCM_TRY(pcm_traffic_start(&t, ctx));

    /* The own part overlaps the traffic. It overwrites the band and the halos are added after. */
    d = pcm_window_desc(g, g->n, l->p, l->q, l->y0, l->y1);
    status = pcm_local_backward_data(ctx, &d, grad_output_band, weight, grad_input_band);
    pcm_status waited = pcm_traffic_wait(&t);
    if (status == PCM_OK)
        status = waited;
    if (status != PCM_OK)
        goto cleanup;

    offset = 0;
    for (int peer = 0; peer < ctx->size; ++peer) {
        if (peer == ctx->rank)
            continue;
        for (int part = 0; part < 2; ++part) {
            lo = arrived_rows[4 * peer + 2 * part];
            hi = arrived_rows[4 * peer + 2 * part + 1];
            pcm_block from = {offset, planes, (hi - lo) * w, (hi - lo) * w};
            pcm_block_add(ctx, arrived, from, grad_input_band,
                          pcm_rows_block(planes, l->q - l->p, w, l->p, lo, hi));
            offset += planes * (hi - lo) * w;
        }
    }
    /* A rank's own halo rows never lie in its own band, so nothing is added locally. */
cleanup:
    pcm_traffic_free(&t);
    free(above);
    free(below);
    free(arrived);
    free(arrived_rows);
    return status;
}

/* grad_weight / grad_bias of the band (not yet summed over ranks). */
static pcm_status backward_weight_band(const pcm_mpi *ctx, const rows_layout *l,
                                       const void *grad_output_band, const void *input_band,
                                       void *grad_weight, void *grad_bias)
{
    const pcm_conv_desc *g = &ctx->desc;
    const int64_t planes = g->n * g->c;
    const int need_weight = grad_weight != NULL;
    pcm_status status = PCM_OK;
    pcm_traffic t;
    void *above = NULL, *below = NULL, *part = NULL;

    PCM_TRY(pcm_traffic_init(&t, 4 * ctx->size));
    if (need_weight) {
        above = pcm_alloc_elements(ctx, planes * (l->above1 - l->above0) * g->w);
        below = pcm_alloc_elements(ctx, planes * (l->below1 - l->below0) * g->w);
        part = pcm_alloc_elements(ctx, pcm_weight_elements(g));
        if (above == NULL || below == NULL || part == NULL) {
            status = PCM_ERR_OUT_OF_MEMORY;
            goto cleanup;
        }
        PCM_TRY(queue_input_halos(ctx, l, input_band, above, below, &t));
        PCM_TRY(pcm_traffic_start(&t, ctx));
    }

    pcm_conv_desc d = pcm_window_desc(g, g->n, l->p, l->q, l->y0, l->y1);
    status = pcm_local_backward_weight(ctx, &d, grad_output_band, input_band, grad_weight,
                                       grad_bias);
    pcm_status waited = pcm_traffic_wait(&t);
    if (status == PCM_OK)
        status = waited;
    if (status != PCM_OK || !need_weight)
        goto cleanup;

    const int64_t wsize = pcm_weight_elements(g);
    const pcm_block whole = {0, 1, wsize, wsize};
    if (l->above1 > l->above0) {
        d = pcm_window_desc(g, g->n, l->above0, l->above1, l->y0, l->y1);
        PCM_TRY(pcm_local_backward_weight(ctx, &d, grad_output_band, above, part, NULL));
        pcm_block_add(ctx, part, whole, grad_weight, whole);
    }
    if (l->below1 > l->below0) {
        d = pcm_window_desc(g, g->n, l->below0, l->below1, l->y0, l->y1);
        PCM_TRY(pcm_local_backward_weight(ctx, &d, grad_output_band, below, part, NULL));
        pcm_block_add(ctx, part, whole, grad_weight, whole);
    }
cleanup:
    pcm_traffic_free(&t);
    free(above);
    free(below);
    free(part);
    return status;
}

pcm_status pcm_rows_backward_band(const pcm_mpi *ctx, const void *grad_output_band,
                                  const void *input_band, const void *weight,
                                  void *grad_input_band, void *grad_weight, void *grad_bias,
                                  int root_only)
{
    const rows_layout l = layout_of(ctx, ctx->rank);
    pcm_status status = PCM_OK;

    if (ctx->need & PCM_NEED_INPUT)
        PCM_TRY(backward_data_band(ctx, &l, grad_output_band, weight, grad_input_band));
    if (ctx->need & (PCM_NEED_WEIGHT | PCM_NEED_BIAS)) {
        void *gw = (ctx->need & PCM_NEED_WEIGHT) ? grad_weight : NULL;
        void *gb = (ctx->need & PCM_NEED_BIAS) ? grad_bias : NULL;
        PCM_TRY(backward_weight_band(ctx, &l, grad_output_band, input_band, gw, gb));
        if (gw != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gw, pcm_weight_elements(&ctx->desc), root_only));
        if (gb != NULL)
            PCM_TRY(pcm_sum_identical(ctx, gb, ctx->desc.k, root_only));
    }
cleanup:
    return status;
}
