/* Agreement before traffic: one allgather of every rank's status and arguments, so that a bad
 * argument on one rank makes every rank return an error instead of leaving peers waiting. */
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

/* Layout of one rank's record in the agreement allgather. Fields from FIELD_MATCH on must be
 * equal on every rank. */
enum {
    FIELD_STATUS = 0,
    FIELD_N = 1,        /* local batch (BATCH placement) */
    FIELD_HAS_BIAS = 2, /* rank 0's value counts for ROOT placement */
    FIELD_THREADS = 3,  /* may differ between ranks */
    FIELD_MATCH = 4,
    FIELD_COUNT = FIELD_MATCH + 28
};

void pcm_band(int64_t rows, int64_t active, int64_t rank, int64_t *start, int64_t *stop)
{
    if (rank >= active) {
        *start = *stop = rows;
        return;
    }
    pcm_row_band(rows, active, rank, start, stop);
}

static void fill_record(int64_t *record, int placement, int strategy, int64_t grid_batch,
                        int64_t grid_channels, int64_t active_ranks, int dtype, int need,
                        const pcm_conv_desc *d, const pcm_exec *e, int has_bias,
                        pcm_status local_status)
{
    memset(record, 0, FIELD_COUNT * sizeof(int64_t));
    record[FIELD_STATUS] = local_status;
    if (local_status != PCM_OK)
        return;
    record[FIELD_N] = d->n;
    record[FIELD_HAS_BIAS] = has_bias;
    record[FIELD_THREADS] = e->threads;

    int64_t *m = record + FIELD_MATCH;
    const int64_t fields[] = {
        placement, strategy, grid_batch, grid_channels, active_ranks, dtype, need,
        d->c, d->h, d->w, d->k, d->r, d->s, d->out_h, d->out_w, d->stride_h, d->stride_w,
        d->pad_top, d->pad_left, d->pad_bottom, d->pad_right, d->dilation_h, d->dilation_w,
        d->groups, e->algorithm, e->block_k, e->block_c, e->block_w,
    };
    memcpy(m, fields, sizeof fields);
}

/* The status this rank returns once every record is known. */
static pcm_status agreed_status(const int64_t *records, int size, int rank, int placement)
{
    for (int r = 0; r < size; ++r)
        if (records[r * FIELD_COUNT + FIELD_STATUS] != PCM_OK)
            return records[rank * FIELD_COUNT + FIELD_STATUS] != PCM_OK
                       ? (pcm_status)records[rank * FIELD_COUNT + FIELD_STATUS]
                       : PCM_ERR_REMOTE;
    for (int r = 1; r < size; ++r) {
        if (memcmp(records + r * FIELD_COUNT + FIELD_MATCH, records + FIELD_MATCH,
                   (FIELD_COUNT - FIELD_MATCH) * sizeof(int64_t)) != 0)
            return PCM_ERR_INVALID_ARGUMENT;
        if (placement != PCM_PLACEMENT_BATCH && placement != PCM_PLACEMENT_ROOT &&
            records[r * FIELD_COUNT + FIELD_N] != records[FIELD_N])
            return PCM_ERR_INVALID_ARGUMENT;
        if (placement != PCM_PLACEMENT_ROOT &&
            records[r * FIELD_COUNT + FIELD_HAS_BIAS] != records[FIELD_HAS_BIAS])
            return PCM_ERR_INVALID_ARGUMENT;
    }
    return PCM_OK;
}

/* Check what can be checked without talking to other ranks. */
static pcm_status check_local(int size, int placement, int strategy, int64_t grid_batch,
                              int64_t grid_channels, int64_t active_ranks, int dtype,
                              const pcm_conv_desc *desc, const pcm_exec *exec)
{
    if (dtype != PCM_FLOAT32 && dtype != PCM_FLOAT64)
        return PCM_ERR_INVALID_ARGUMENT;
    if (placement < PCM_PLACEMENT_REPLICATED || placement > PCM_PLACEMENT_ROWS)
        return PCM_ERR_INVALID_ARGUMENT;
    if (exec == NULL || exec->algorithm < PCM_ALGO_AUTO || exec->algorithm > PCM_ALGO_REFERENCE ||
        exec->threads < 0 || exec->block_k < 0 || exec->block_c < 0 || exec->block_w < 0)
        return PCM_ERR_INVALID_ARGUMENT;
    if (pcm_desc_check(desc) != PCM_OK)
        return PCM_ERR_INVALID_ARGUMENT;
    if (placement == PCM_PLACEMENT_REPLICATED || placement == PCM_PLACEMENT_ROOT) {
        if (strategy < PCM_STRATEGY_BATCH || strategy > PCM_STRATEGY_HYBRID)
            return PCM_ERR_INVALID_ARGUMENT;
        if (strategy == PCM_STRATEGY_HYBRID &&
            (grid_batch < 1 || grid_channels < 1 || grid_batch > size ||
             grid_channels > size || grid_batch * grid_channels > size))
            return PCM_ERR_INVALID_ARGUMENT;
    }
    if (active_ranks < 0 || active_ranks > size)
        return PCM_ERR_INVALID_ARGUMENT;
    return PCM_OK;
}

pcm_status pcm_mpi_begin(int comm_f, int placement, int strategy, int64_t grid_batch,
                         int64_t grid_channels, int64_t active_ranks, int dtype, int need,
                         const pcm_conv_desc *desc, const pcm_exec *exec, int has_bias,
                         pcm_status local_status, pcm_mpi *ctx)
{
    pcm_status status = PCM_OK;
    int64_t *records = NULL;
    int64_t own[FIELD_COUNT];
    int initialized = 0, finalized = 0;

    memset(ctx, 0, sizeof *ctx);
    ctx->comm = MPI_COMM_NULL;
    if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized ||
        MPI_Finalized(&finalized) != MPI_SUCCESS || finalized)
        return PCM_ERR_MPI;

    /* The duplicate is made before any check so that every rank takes part in it. */
    MPI_Comm user = MPI_Comm_f2c(comm_f);
    if (user == MPI_COMM_NULL)
        return PCM_ERR_INVALID_ARGUMENT;
    if (MPI_Comm_dup(user, &ctx->comm) != MPI_SUCCESS) {
        ctx->comm = MPI_COMM_NULL;
        return PCM_ERR_MPI;
    }
    PCM_MPI_TRY(MPI_Comm_set_errhandler(ctx->comm, MPI_ERRORS_RETURN));
    PCM_MPI_TRY(MPI_Comm_rank(ctx->comm, &ctx->rank));
    PCM_MPI_TRY(MPI_Comm_size(ctx->comm, &ctx->size));

    if (local_status == PCM_OK)
        local_status = check_local(ctx->size, placement, strategy, grid_batch, grid_channels,
                                   active_ranks, dtype, desc, exec);
    fill_record(own, placement, strategy, grid_batch, grid_channels, active_ranks, dtype, need,
                desc, exec, has_bias, local_status);

    records = malloc((size_t)ctx->size * sizeof own);
    ctx->batch_start = malloc(((size_t)ctx->size + 1) * sizeof(int64_t));
    /* A rank that could not allocate the records reports it to the others through a fixed-size
     * reduction first, so that no rank waits in an allgather that this rank cannot join. */
    int failed = records == NULL || ctx->batch_start == NULL, any_failed = 0;
    PCM_MPI_TRY(MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, ctx->comm));
    if (any_failed) {
        status = failed ? PCM_ERR_OUT_OF_MEMORY : PCM_ERR_REMOTE;
        goto cleanup;
    }
    PCM_MPI_TRY(MPI_Allgather(own, FIELD_COUNT, MPI_INT64_T, records, FIELD_COUNT, MPI_INT64_T,
                              ctx->comm));

    status = agreed_status(records, ctx->size, ctx->rank, placement);
    if (status != PCM_OK)
        goto cleanup;

    ctx->dtype = dtype;
    ctx->type = dtype == PCM_FLOAT32 ? MPI_FLOAT : MPI_DOUBLE;
    ctx->esize = dtype == PCM_FLOAT32 ? sizeof(float) : sizeof(double);
    ctx->placement = placement;
    ctx->strategy = strategy;
    ctx->need = need;
    ctx->has_bias = (int)records[FIELD_HAS_BIAS]; /* rank 0's value */
    ctx->desc = *desc;
    ctx->exec = *exec;
    ctx->grid_batch = grid_batch;
    ctx->grid_channels = grid_channels;
    ctx->active = active_ranks > 0 ? active_ranks : ctx->size;
    if (placement == PCM_PLACEMENT_ROOT)
        ctx->desc.n = records[FIELD_N];

    ctx->batch_start[0] = 0;
    for (int r = 0; r < ctx->size; ++r)
        ctx->batch_start[r + 1] = ctx->batch_start[r] +
                                  (placement == PCM_PLACEMENT_BATCH ? records[r * FIELD_COUNT + FIELD_N]
                                                                    : 0);
    if (placement == PCM_PLACEMENT_BATCH) {
        ctx->desc.n = ctx->batch_start[ctx->size];
        ctx->active = ctx->size;
        if (pcm_desc_check(&ctx->desc) != PCM_OK)
            status = PCM_ERR_INVALID_ARGUMENT; /* same outcome on every rank */
    }
    if (placement == PCM_PLACEMENT_ROWS)
        ctx->active = ctx->size;

cleanup:
    free(records);
    if (status != PCM_OK)
        pcm_mpi_end(ctx);
    return status;
}

void pcm_mpi_end(pcm_mpi *ctx)
{
    if (ctx->comm != MPI_COMM_NULL)
        MPI_Comm_free(&ctx->comm);
    ctx->comm = MPI_COMM_NULL;
    free(ctx->batch_start);
    ctx->batch_start = NULL;
}
