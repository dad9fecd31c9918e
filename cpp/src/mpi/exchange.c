/* Data movement of the MPI drivers: strided blocks sent point to point with large-count calls,
 * local block copies, identical sums, and local kernels that accept empty arrays. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

#include <limits.h>

/* MPI 4 has large-count calls (MPI_Isend_c and friends). Older MPIs (Open MPI 4) get the same
 * messages through derived datatypes of chunks and collectives split into chunks. Defining
 * PCM_MPI_INT_COUNTS forces that path, so that tests can run it on an MPI 4 library too. */
#if defined(MPI_VERSION) && MPI_VERSION >= 4 && !defined(PCM_MPI_INT_COUNTS)
#define PCM_LARGE_COUNT 1
#else
#define PCM_LARGE_COUNT 0
#endif

/* Largest count one int-count call takes, and the elements per piece beyond it. Both can be
 * lowered at compile time so that tests reach the multi-piece code with small arrays. */
#ifndef PCM_INT_LIMIT
#define PCM_INT_LIMIT INT_MAX
#endif
#ifndef PCM_CHUNK
#define PCM_CHUNK ((int64_t)1 << 30)
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

#if !PCM_LARGE_COUNT
/* Datatype of count consecutive elements of base when count may exceed INT_MAX: whole chunks
 * and a remainder joined in one struct type. */
static int contiguous_type(int64_t count, MPI_Datatype base, size_t esize, MPI_Datatype *out)
{
    MPI_Datatype chunk, chunks, rest;
    int rc;

    if (count <= PCM_INT_LIMIT)
        return MPI_Type_contiguous((int)count, base, out);
    const int64_t whole = count / PCM_CHUNK, remainder = count % PCM_CHUNK;
    if ((rc = MPI_Type_contiguous((int)PCM_CHUNK, base, &chunk)) != MPI_SUCCESS)
        return rc;
    rc = MPI_Type_contiguous((int)whole, chunk, &chunks);
    MPI_Type_free(&chunk);
    if (rc != MPI_SUCCESS || remainder == 0) {
        *out = chunks;
        return rc;
    }
    if ((rc = MPI_Type_contiguous((int)remainder, base, &rest)) != MPI_SUCCESS) {
        MPI_Type_free(&chunks);
        return rc;
    }
    int lengths[2] = {1, 1};
    MPI_Aint offsets[2] = {0, (MPI_Aint)(whole * PCM_CHUNK * (int64_t)esize)};
    MPI_Datatype types[2] = {chunks, rest};
    rc = MPI_Type_create_struct(2, lengths, offsets, types, out);
    MPI_Type_free(&chunks);
    MPI_Type_free(&rest);
    return rc;
}
#endif

/* Post one message. A strided block travels as one element of a vector type, which MPI may
 * free as soon as the operation is posted. */
static int post(const pcm_mpi *ctx, const pcm_message *m, int is_send, MPI_Request *request)
{
    char *buf = (char *)m->base + m->block.offset * ctx->esize;
    const int strided = m->block.count > 1 && m->block.length != m->block.stride;
    MPI_Datatype type = ctx->type;
    int rc;

#if PCM_LARGE_COUNT
    MPI_Count count = pcm_block_elements(m->block);
    if (strided) {
        rc = MPI_Type_vector_c(m->block.count, m->block.length, m->block.stride, ctx->type, &type);
        count = 1;
    } else {
        rc = MPI_SUCCESS;
    }
#else
    int count = 1;
    if (strided) {
        MPI_Datatype run;
        if (m->block.count > INT_MAX)
            return MPI_ERR_COUNT;
        rc = contiguous_type(m->block.length, ctx->type, ctx->esize, &run);
        if (rc == MPI_SUCCESS) {
            rc = MPI_Type_create_hvector((int)m->block.count, 1,
                                         (MPI_Aint)(m->block.stride * (int64_t)ctx->esize), run,
                                         &type);
            MPI_Type_free(&run);
        }
    } else if (pcm_block_elements(m->block) <= PCM_INT_LIMIT) {
        count = (int)pcm_block_elements(m->block);
        rc = MPI_SUCCESS;
    } else {
        rc = contiguous_type(pcm_block_elements(m->block), ctx->type, ctx->esize, &type);
    }
#endif
    if (rc != MPI_SUCCESS)
        return rc;
    if (type != ctx->type && (rc = MPI_Type_commit(&type)) != MPI_SUCCESS) {
        MPI_Type_free(&type);
        return rc;
    }
#if PCM_LARGE_COUNT
    if (is_send)
        rc = MPI_Isend_c(buf, count, type, m->peer, m->tag, ctx->comm, request);
    else
        rc = MPI_Irecv_c(buf, count, type, m->peer, m->tag, ctx->comm, request);
#else
    if (is_send)
        rc = MPI_Isend(buf, count, type, m->peer, m->tag, ctx->comm, request);
    else
        rc = MPI_Irecv(buf, count, type, m->peer, m->tag, ctx->comm, request);
#endif
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

/* Reduction to rank 0 of count elements (in place on rank 0). */
static int reduce_to_root(const pcm_mpi *ctx, char *buf, int64_t count)
{
#if PCM_LARGE_COUNT
    return MPI_Reduce_c(ctx->rank == 0 ? MPI_IN_PLACE : buf, ctx->rank == 0 ? buf : NULL, count,
                        ctx->type, MPI_SUM, 0, ctx->comm);
#else
    /* Pieces in the same order on every rank, so the collectives match. */
    for (int64_t done = 0; done < count; done += PCM_CHUNK) {
        const int piece = (int)pcm_min64(PCM_CHUNK, count - done);
        const size_t offset = (size_t)done * ctx->esize;
        int rc = MPI_Reduce(ctx->rank == 0 ? MPI_IN_PLACE : buf + offset,
                            ctx->rank == 0 ? buf + offset : NULL, piece, ctx->type, MPI_SUM, 0,
                            ctx->comm);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return MPI_SUCCESS;
#endif
}

static int broadcast(const pcm_mpi *ctx, char *buf, int64_t count)
{
#if PCM_LARGE_COUNT
    return MPI_Bcast_c(buf, count, ctx->type, 0, ctx->comm);
#else
    for (int64_t done = 0; done < count; done += PCM_CHUNK) {
        const int piece = (int)pcm_min64(PCM_CHUNK, count - done);
        int rc = MPI_Bcast(buf + (size_t)done * ctx->esize, piece, ctx->type, 0, ctx->comm);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return MPI_SUCCESS;
#endif
}

pcm_status pcm_sum_identical(const pcm_mpi *ctx, void *buf, int64_t count, int root_only)
{
    if (ctx->size == 1 || count == 0)
        return PCM_OK;
    if (reduce_to_root(ctx, buf, count) != MPI_SUCCESS)
        return PCM_ERR_MPI;
    if (!root_only && broadcast(ctx, buf, count) != MPI_SUCCESS)
        return PCM_ERR_MPI;
    return PCM_OK;
}

pcm_status pcm_bcast(const pcm_mpi *ctx, void *buf, int64_t count)
{
    if (ctx->size == 1 || count == 0)
        return PCM_OK;
    return broadcast(ctx, buf, count) == MPI_SUCCESS ? PCM_OK : PCM_ERR_MPI;
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

