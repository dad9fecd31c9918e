/* Public MPI entry points: check this rank's arrays, agree with every other rank, then run the
 * strategy (rows.c and halo.c for rows, grid.c for batch, channels and hybrid). */
#include "mpi_internal.h"

/* Rank of the caller in the communicator, or -1 when MPI is not usable. */
static int caller_rank(int comm_f)
{
    int initialized = 0, finalized = 0, rank = -1;
    if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized ||
        MPI_Finalized(&finalized) != MPI_SUCCESS || finalized)
        return -1;
    MPI_Comm comm = MPI_Comm_f2c(comm_f);
    if (comm == MPI_COMM_NULL || MPI_Comm_rank(comm, &rank) != MPI_SUCCESS)
        return -1;
    return rank;
}

static int caller_size(int comm_f)
{
    int size = 0;
    if (MPI_Comm_size(MPI_Comm_f2c(comm_f), &size) != MPI_SUCCESS)
        return 0;
    return size;
}

static int missing(const void *array, int64_t elements) { return array == NULL && elements > 0; }

/* Return PCM_ERR_UNSUPPORTED unless the requested algorithm computes every op of the call. Every
 * rank computes the same result before the agreement, so all ranks fail together. Otherwise the
 * ranks with work would fail while the others waited for their results. */
static pcm_status algorithm_status(const pcm_exec *exec, const pcm_conv_desc *desc, int forward,
                                   int need)
{
    const int64_t algorithm = exec->algorithm;
    if (algorithm < PCM_ALGO_AUTO || algorithm > PCM_ALGO_REFERENCE)
        return PCM_OK; /* invalid rather than unsupported, so the agreement's checks reject it */
    if (forward)
        return pcm_algorithm_supported(algorithm, PCM_OP_FORWARD, desc) ? PCM_OK
                                                                        : PCM_ERR_UNSUPPORTED;
    if ((need & PCM_NEED_INPUT) &&
        !pcm_algorithm_supported(algorithm, PCM_OP_BACKWARD_DATA, desc))
        return PCM_ERR_UNSUPPORTED;
    if ((need & (PCM_NEED_WEIGHT | PCM_NEED_BIAS)) &&
        !pcm_algorithm_supported(algorithm, PCM_OP_BACKWARD_WEIGHT, desc))
        return PCM_ERR_UNSUPPORTED;
    return PCM_OK;
}

/* Local element counts of input and output under a placement (ROWS: this rank's bands). */
static void local_counts(int comm_f, int rank, int placement, const pcm_conv_desc *d,
                         int64_t *input_out, int64_t *output_out)
{
    int64_t h = d->h, out_h = d->out_h;
    if (placement == PCM_PLACEMENT_ROWS) {
        const int size = caller_size(comm_f);
        int64_t p = 0, q = 0, y0 = 0, y1 = 0;
        if (size > 0 && pcm_row_band(d->h, size, rank, &p, &q) == PCM_OK &&
            pcm_row_band(d->out_h, size, rank, &y0, &y1) == PCM_OK) {
            h = q - p;
            out_h = y1 - y0;
        }
    }
    *input_out = d->n * d->c * h * d->w;
    *output_out = d->n * d->k * out_h * d->out_w;
}

pcm_status pcm_mpi_conv2d_forward(int comm_f, int placement, int strategy, int64_t grid_batch,
                                  int64_t grid_channels, int64_t active_ranks, int dtype,
                                  const pcm_conv_desc *desc, const pcm_exec *exec,
                                  const void *input, const void *weight, const void *bias,
                                  void *output)
{
    pcm_status local = PCM_OK, status;
    pcm_mpi ctx;
    const int rank = caller_rank(comm_f);

    if (rank < 0)
        return PCM_ERR_MPI;
    if (desc == NULL || exec == NULL || pcm_desc_check(desc) != PCM_OK) {
        local = PCM_ERR_INVALID_ARGUMENT;
    } else if (placement != PCM_PLACEMENT_ROOT || rank == 0) {
        int64_t in_count, out_count;
        local_counts(comm_f, rank, placement, desc, &in_count, &out_count);
        if (missing(input, in_count) || missing(weight, pcm_weight_elements(desc)) ||
            missing(output, out_count))
            local = PCM_ERR_INVALID_ARGUMENT;
    }
    if (local == PCM_OK)
        local = algorithm_status(exec, desc, 1, 0);

    status = pcm_mpi_begin(comm_f, placement, strategy, grid_batch, grid_channels, active_ranks,
                           dtype, 0, desc, exec, bias != NULL, local, &ctx);
    if (status != PCM_OK)
        return status;

    if (placement == PCM_PLACEMENT_ROWS ||
        (placement != PCM_PLACEMENT_BATCH && strategy == PCM_STRATEGY_ROWS))
        status = pcm_rows_forward(&ctx, input, weight, bias, output);
    else
        status = pcm_grid_forward(&ctx, input, weight, bias, output);
    pcm_mpi_end(&ctx);
    return status;
}

pcm_status pcm_mpi_conv2d_backward(int comm_f, int placement, int strategy, int64_t grid_batch,
                                   int64_t grid_channels, int64_t active_ranks, int dtype,
                                   int need, const pcm_conv_desc *desc, const pcm_exec *exec,
                                   const void *grad_output, const void *input,
                                   const void *weight, void *grad_input, void *grad_weight,
                                   void *grad_bias)
{
    pcm_status local = PCM_OK, status;
    pcm_mpi ctx;
    const int rank = caller_rank(comm_f);

    if (rank < 0)
        return PCM_ERR_MPI;
    if (desc == NULL || exec == NULL || pcm_desc_check(desc) != PCM_OK ||
        (need & ~(PCM_NEED_INPUT | PCM_NEED_WEIGHT | PCM_NEED_BIAS)) != 0) {
        local = PCM_ERR_INVALID_ARGUMENT;
    } else if (placement != PCM_PLACEMENT_ROOT || rank == 0) {
        int64_t in_count, out_count;
        const int64_t w_count = pcm_weight_elements(desc);
        local_counts(comm_f, rank, placement, desc, &in_count, &out_count);
        if (missing(grad_output, out_count) ||
            ((need & PCM_NEED_WEIGHT) && (missing(input, in_count) || missing(grad_weight, w_count))) ||
            ((need & PCM_NEED_INPUT) && (missing(weight, w_count) || missing(grad_input, in_count))) ||
            ((need & PCM_NEED_BIAS) && missing(grad_bias, desc->k)))
            local = PCM_ERR_INVALID_ARGUMENT;
    }
    if (local == PCM_OK)
        local = algorithm_status(exec, desc, 0, need);

    status = pcm_mpi_begin(comm_f, placement, strategy, grid_batch, grid_channels, active_ranks,
                           dtype, need, desc, exec, 0, local, &ctx);
    if (status != PCM_OK || need == 0) {
        if (status == PCM_OK)
            pcm_mpi_end(&ctx);
        return status;
    }

    if (placement == PCM_PLACEMENT_ROWS ||
        (placement != PCM_PLACEMENT_BATCH && strategy == PCM_STRATEGY_ROWS))
        status = pcm_rows_backward(&ctx, grad_output, input, weight, grad_input, grad_weight,
                                   grad_bias);
    else
        status = pcm_grid_backward(&ctx, grad_output, input, weight, grad_input, grad_weight,
                                   grad_bias);
    pcm_mpi_end(&ctx);
    return status;
}
