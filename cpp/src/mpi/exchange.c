/* Data movement of the MPI drivers: strided blocks sent point to point with large-count calls,
 * local block copies, identical sums, and local kernels that accept empty arrays. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

#if !defined(MPI_VERSION) || MPI_VERSION < 4
#error "pyconvmpi's MPI drivers use the large-count calls of MPI 4 (MPI_Isend_c and friends)"
#endif

void pcm_block_copy(const pcm_mpi *ctx, const void *src, pcm_block from, void *dst, pcm_block to)
{
    const size_t es = ctx->esize;
    const char *s = (const char *)src + from.offset * es;
    char *d = (char *)dst + to.offset * es;
    const int64_t total = pcm_block_elements(from);

    if (total == 0)
        return;
    if (from.count == to.count && from.length == to.length) {
#pragma omp parallel for schedule(static) num_threads(pcm_threads(&ctx->exec)) if (total > 65536)
        for (int64_t i = 0; i < from.count; ++i)
            memcpy(d + i * to.stride * es, s + i * from.stride * es, from.length * es);
        return;
    }
    /* Different run shapes: walk element runs of both blocks (used for contiguous buffers). */
    int64_t done = 0;
    while (done < total) {
        int64_t fi = done / from.length, fo = done % from.length;
        int64_t ti = done / to.length, to_o = done % to.length;
        int64_t run = pcm_min64(from.length - fo, to.length - to_o);
        memcpy(d + (ti * to.stride + to_o) * es, s + (fi * from.stride + fo) * es, run * es);
        done += run;
    }
}

#define DEFINE_ADD(T, name)                                                                    \
    static void name(const pcm_mpi *ctx, const T *s, pcm_block from, T *d, pcm_block to)      \
    {                                                                                          \
        const int64_t total = pcm_block_elements(from);                                        \
        _Pragma("omp parallel for schedule(static) num_threads(pcm_threads(&ctx->exec)) if (total > 65536)") \
        for (int64_t i = 0; i < from.count; ++i) {                                             \
            const T *a = s + from.offset + i * from.stride;                                    \
            T *b = d + to.offset + i * to.stride;                                              \
            for (int64_t x = 0; x < from.length; ++x)                                          \
                b[x] += a[x];                                                                  \
        }                                                                                      \
    }

DEFINE_ADD(float, add_f32)
DEFINE_ADD(double, add_f64)

void pcm_block_add(const pcm_mpi *ctx, const void *src, pcm_block from, void *dst, pcm_block to)
{
    /* Callers pass blocks of equal run shape. */
    if (pcm_block_elements(from) == 0)
        return;
    if (ctx->dtype == PCM_FLOAT32)
        add_f32(ctx, src, from, dst, to);
    else
        add_f64(ctx, src, from, dst, to);
}

pcm_status pcm_traffic_init(pcm_traffic *t, int capacity)
{
    memset(t, 0, sizeof *t);
    t->capacity = capacity;
    t->sends = malloc((size_t)capacity * sizeof(pcm_message));
    t->recvs = malloc((size_t)capacity * sizeof(pcm_message));
    t->requests = malloc(2 * (size_t)capacity * sizeof(MPI_Request));
    if (t->sends == NULL || t->recvs == NULL || t->requests == NULL) {
        pcm_traffic_free(t);
        return PCM_ERR_OUT_OF_MEMORY;
    }
    return PCM_OK;
}

void pcm_traffic_free(pcm_traffic *t)
{
    free(t->sends);
    free(t->recvs);
    free(t->requests);
    memset(t, 0, sizeof *t);
}

static pcm_status queue(pcm_message *list, int *n, int capacity, const pcm_mpi *ctx, int peer,
                        int tag, void *base, pcm_block block)
{
    if (pcm_block_elements(block) == 0 || peer == ctx->rank)
        return PCM_OK;
    if (*n >= capacity)
        return PCM_ERR_INTERNAL;
    list[(*n)++] = (pcm_message){peer, tag, base, block};
    return PCM_OK;
}

pcm_status pcm_traffic_send(pcm_traffic *t, const pcm_mpi *ctx, int peer, int tag,
                            const void *base, pcm_block block)
{
    return queue(t->sends, &t->n_sends, t->capacity, ctx, peer, tag, (void *)base, block);
}

pcm_status pcm_traffic_recv(pcm_traffic *t, const pcm_mpi *ctx, int peer, int tag, void *base,
                            pcm_block block)
{
    return queue(t->recvs, &t->n_recvs, t->capacity, ctx, peer, tag, base, block);
}

/* Post one message; a strided block travels as one element of a vector type, which MPI may
 * free as soon as the operation is posted. */
static int post(const pcm_mpi *ctx, const pcm_message *m, int is_send, MPI_Request *request)
{
    char *buf = (char *)m->base + m->block.offset * ctx->esize;
    MPI_Datatype type = ctx->type;
    MPI_Count count = pcm_block_elements(m->block);
    int rc;

    if (m->block.count > 1 && m->block.length != m->block.stride) {
        rc = MPI_Type_vector_c(m->block.count, m->block.length, m->block.stride, ctx->type, &type);
        if (rc != MPI_SUCCESS)
            return rc;
        rc = MPI_Type_commit(&type);
        if (rc != MPI_SUCCESS)
            return rc;
        count = 1;
    }
    if (is_send)
        rc = MPI_Isend_c(buf, count, type, m->peer, m->tag, ctx->comm, request);
    else
        rc = MPI_Irecv_c(buf, count, type, m->peer, m->tag, ctx->comm, request);
    if (type != ctx->type)
        MPI_Type_free(&type);
    return rc;
}

pcm_status pcm_traffic_start(pcm_traffic *t, const pcm_mpi *ctx)
{
    pcm_status status = PCM_OK;

    t->n_requests = 0;
    for (int i = 0; i < t->n_recvs; ++i)
        PCM_MPI_TRY(post(ctx, &t->recvs[i], 0, &t->requests[t->n_requests++]));
    for (int i = 0; i < t->n_sends; ++i)
        PCM_MPI_TRY(post(ctx, &t->sends[i], 1, &t->requests[t->n_requests++]));
cleanup:
    return status;
}

pcm_status pcm_traffic_wait(pcm_traffic *t)
{
    int n = t->n_requests;
    t->n_requests = 0;
    if (n == 0)
        return PCM_OK;
    return MPI_Waitall(n, t->requests, MPI_STATUSES_IGNORE) == MPI_SUCCESS ? PCM_OK : PCM_ERR_MPI;
}

pcm_status pcm_sum_identical(const pcm_mpi *ctx, void *buf, int64_t count, int root_only)
{
    int rc;
    if (ctx->size == 1 || count == 0)
        return PCM_OK;
    if (ctx->rank == 0)
        rc = MPI_Reduce_c(MPI_IN_PLACE, buf, count, ctx->type, MPI_SUM, 0, ctx->comm);
    else
        rc = MPI_Reduce_c(buf, NULL, count, ctx->type, MPI_SUM, 0, ctx->comm);
    if (rc != MPI_SUCCESS)
        return PCM_ERR_MPI;
    if (!root_only && MPI_Bcast_c(buf, count, ctx->type, 0, ctx->comm) != MPI_SUCCESS)
        return PCM_ERR_MPI;
    return PCM_OK;
}

pcm_status pcm_bcast(const pcm_mpi *ctx, void *buf, int64_t count)
{
    if (ctx->size == 1 || count == 0)
        return PCM_OK;
    return MPI_Bcast_c(buf, count, ctx->type, 0, ctx->comm) == MPI_SUCCESS ? PCM_OK : PCM_ERR_MPI;
}

/* Stand-in for the pointer of an empty array; the kernels read nothing through it. */
static const double empty_array[1] = {0.0};

static const void *nonnull(const void *p) { return p != NULL ? p : empty_array; }

pcm_status pcm_local_forward(const pcm_mpi *ctx, const pcm_conv_desc *d, const void *input,
                             const void *weight, const void *bias, void *output)
{
    if (pcm_output_elements(d) == 0)
        return PCM_OK;
    return pcm_conv2d_forward(ctx->dtype, d, &ctx->exec, nonnull(input), nonnull(weight), bias,
                              output);
}

pcm_status pcm_local_backward_data(const pcm_mpi *ctx, const pcm_conv_desc *d,
                                   const void *grad_output, const void *weight, void *grad_input)
{
    if (pcm_input_elements(d) == 0)
        return PCM_OK;
    return pcm_conv2d_backward_data(ctx->dtype, d, &ctx->exec, nonnull(grad_output),
                                    nonnull(weight), grad_input);
}

pcm_status pcm_local_backward_weight(const pcm_mpi *ctx, const pcm_conv_desc *d,
                                     const void *grad_output, const void *input,
                                     void *grad_weight, void *grad_bias)
{
    if (grad_weight == NULL && grad_bias == NULL)
        return PCM_OK;
    if (pcm_output_elements(d) == 0) {
        if (grad_weight != NULL)
            memset(grad_weight, 0, (size_t)pcm_weight_elements(d) * ctx->esize);
        if (grad_bias != NULL)
            memset(grad_bias, 0, (size_t)d->k * ctx->esize);
        return PCM_OK;
    }
    return pcm_conv2d_backward_weight(ctx->dtype, d, &ctx->exec, grad_output, nonnull(input),
                                      grad_weight, grad_bias);
}

pcm_conv_desc pcm_window_desc(const pcm_conv_desc *global, int64_t n, int64_t u, int64_t v,
                              int64_t y0, int64_t y1)
{
    pcm_conv_desc d = *global;
    d.n = n;
    d.h = pcm_max64(v - u, 0);
    d.out_h = pcm_max64(y1 - y0, 0);
    d.pad_top = global->pad_top + u - y0 * global->stride_h;
    const int64_t span = d.out_h > 0 ? (d.out_h - 1) * d.stride_h + d.dilation_h * (d.r - 1) + 1 : 0;
    d.pad_bottom = pcm_max64(0, span - d.h - d.pad_top);
    return d;
}

void pcm_rows_needed(const pcm_conv_desc *d, int64_t y0, int64_t y1, int64_t *lo, int64_t *hi)
{
    if (y1 <= y0) {
        *lo = *hi = 0;
        return;
    }
    *lo = pcm_max64(0, y0 * d->stride_h - d->pad_top);
    *hi = pcm_min64(d->h, (y1 - 1) * d->stride_h - d->pad_top + d->dilation_h * (d->r - 1) + 1);
    if (*hi < *lo)
        *hi = *lo;
}

void *pcm_alloc_elements(const pcm_mpi *ctx, int64_t count)
{
    return malloc((size_t)pcm_max64(count, 1) * ctx->esize);
}

pcm_status pcm_broadcast_parameters(const pcm_mpi *ctx, const void *weight, const void *bias,
                                       void **weight_out, void **bias_out, void **owned_weight,
                                       void **owned_bias)
{
    const int64_t wsize = pcm_weight_elements(&ctx->desc);
    pcm_status status = PCM_OK;

    *owned_weight = *owned_bias = NULL;
    if (ctx->rank == 0) {
        *weight_out = (void *)weight;
        *bias_out = (void *)bias;
    } else {
        *weight_out = *owned_weight = pcm_alloc_elements(ctx, wsize);
        *bias_out = NULL;
        if (ctx->has_bias)
            *bias_out = *owned_bias = pcm_alloc_elements(ctx, ctx->desc.k);
        if (*owned_weight == NULL || (ctx->has_bias && *owned_bias == NULL))
            return PCM_ERR_OUT_OF_MEMORY;
    }
    PCM_TRY(pcm_bcast(ctx, *weight_out, wsize));
    if (ctx->has_bias)
        PCM_TRY(pcm_bcast(ctx, *bias_out, ctx->desc.k));
cleanup:
    return status;
}

