/* Private declarations of the MPI drivers (src/mpi); never installed.
 *
 * Every collective call runs on a pcm_mpi context: a duplicate of the caller's communicator
 * with MPI_ERRORS_RETURN, created by pcm_mpi_begin after all ranks agreed on their arguments.
 * Data moves as strided blocks (pcm_block) in point-to-point messages, so halos, scatters and
 * gathers of any band or channel range share one code path, and no message needs a packed copy.
 *
 * Limitation: the agreement covers argument checks only. A rank that runs out of memory after
 * it returns PCM_ERR_OUT_OF_MEMORY, but its peers may wait for its messages until the job is
 * killed. Gathers to every rank use size * (size - 1) messages rather than a tree, which suits
 * the tens of ranks of one layer, not thousands. */
#ifndef PYCONVMPI_MPI_INTERNAL_H
#define PYCONVMPI_MPI_INTERNAL_H

#include <mpi.h>

#include "pcm_internal.h"

/* Message tags; each call has its own duplicate communicator, so tags only separate the
 * phases of one call. */
enum {
    TAG_SCATTER = 1,
    TAG_HALO_ABOVE = 2,
    TAG_HALO_BELOW = 3,
    TAG_GRAD_ABOVE = 4,
    TAG_GRAD_BELOW = 5,
    TAG_GATHER = 6,
    TAG_GATHER_INPUT = 7,
    TAG_SCATTER_GRAD = 8
};

/* What one collective call agreed on. desc is global: n is the total batch (BATCH placement:
 * the sum of the ranks' slices), h and out_h the full image. */
typedef struct pcm_mpi {
    MPI_Comm comm; /* duplicate of the caller's communicator, MPI_ERRORS_RETURN */
    int rank, size;
    int dtype;
    MPI_Datatype type; /* MPI_FLOAT or MPI_DOUBLE */
    size_t esize;      /* bytes per element */
    int placement, strategy, need, has_bias;
    int64_t grid_batch, grid_channels, active; /* active: ranks that compute */
    pcm_conv_desc desc;
    pcm_exec exec;
    int64_t *batch_start; /* BATCH placement: rank r owns batch items [start[r], start[r + 1]) */
} pcm_mpi;

/* Strided block of an array: count runs of length elements, stride elements apart, starting
 * offset elements into the array. */
typedef struct pcm_block {
    int64_t offset, count, length, stride;
} pcm_block;

/* One point-to-point message of a block of base. */
typedef struct pcm_message {
    int peer, tag;
    void *base;
    pcm_block block;
} pcm_message;

/* Growable list of messages and their requests. */
typedef struct pcm_traffic {
    pcm_message *sends, *recvs;
    int n_sends, n_recvs, capacity;
    MPI_Request *requests;
    int n_requests;
} pcm_traffic;

static inline int64_t pcm_block_elements(pcm_block b) { return b.count * b.length; }

/* Block of rows [start, stop) of every (n, c) plane of an array [planes][rows][width], where the
 * array itself starts at row first (its rows are [first, first + rows)). */
static inline pcm_block pcm_rows_block(int64_t planes, int64_t rows, int64_t width,
                                       int64_t first, int64_t start, int64_t stop)
{
    pcm_block b = {(start - first) * width, planes, (stop - start) * width, rows * width};
    if (stop <= start)
        b.count = 0;
    return b;
}

/* Block of channels [start, stop) of items [n0, n1) of an array [n][channels][inner]. */
static inline pcm_block pcm_channel_block(int64_t n0, int64_t n1, int64_t channels,
                                          int64_t inner, int64_t start, int64_t stop)
{
    pcm_block b = {(n0 * channels + start) * inner, n1 - n0, (stop - start) * inner,
                   channels * inner};
    if (stop <= start || n1 <= n0)
        b.count = 0;
    return b;
}

/* Band [*start, *stop) of `rows` over `active` ranks; ranks >= active get an empty band. */
PCM_INTERNAL void pcm_band(int64_t rows, int64_t active, int64_t rank, int64_t *start,
                           int64_t *stop);

/* Agree on the status of a call: every rank passes its own status and arguments, and all ranks
 * return the same outcome (PCM_ERR_REMOTE on ranks that were fine while another was not).
 * ctx->comm exists only when the returned status is PCM_OK, and pcm_mpi_end frees it. */
PCM_INTERNAL pcm_status pcm_mpi_begin(int comm_f, int placement, int strategy, int64_t grid_batch,
                                      int64_t grid_channels, int64_t active_ranks, int dtype,
                                      int need, const pcm_conv_desc *desc, const pcm_exec *exec,
                                      int has_bias, pcm_status local_status, pcm_mpi *ctx);
PCM_INTERNAL void pcm_mpi_end(pcm_mpi *ctx);

/* Copy a block of src into a block of dst of equal element count (OpenMP over runs). */
PCM_INTERNAL void pcm_block_copy(const pcm_mpi *ctx, const void *src, pcm_block from, void *dst,
                                 pcm_block to);
/* dst block += src block. */
PCM_INTERNAL void pcm_block_add(const pcm_mpi *ctx, const void *src, pcm_block from, void *dst,
                                pcm_block to);

PCM_INTERNAL pcm_status pcm_traffic_init(pcm_traffic *t, int capacity);
PCM_INTERNAL void pcm_traffic_free(pcm_traffic *t);
/* Queue a send or receive; empty blocks and messages to oneself are dropped (the caller copies
 * local data itself). */
PCM_INTERNAL pcm_status pcm_traffic_send(pcm_traffic *t, const pcm_mpi *ctx, int peer, int tag,
                                         const void *base, pcm_block block);
PCM_INTERNAL pcm_status pcm_traffic_recv(pcm_traffic *t, const pcm_mpi *ctx, int peer, int tag,
                                         void *base, pcm_block block);
/* Post every queued message, receives first; pcm_traffic_wait completes them. */
PCM_INTERNAL pcm_status pcm_traffic_start(pcm_traffic *t, const pcm_mpi *ctx);
PCM_INTERNAL pcm_status pcm_traffic_wait(pcm_traffic *t);

/* Sum count elements of buf over all ranks so that every rank (or only rank 0 when
 * root_only) gets the same, bit-identical result: a reduction to rank 0, then a broadcast. */
PCM_INTERNAL pcm_status pcm_sum_identical(const pcm_mpi *ctx, void *buf, int64_t count,
                                          int root_only);
/* Broadcast count elements from rank 0 (large-count call). */
PCM_INTERNAL pcm_status pcm_bcast(const pcm_mpi *ctx, void *buf, int64_t count);

/* malloc of count elements (at least one, so that empty arrays get a valid pointer). */
PCM_INTERNAL void *pcm_alloc_elements(const pcm_mpi *ctx, int64_t count);
/* Weight and bias on every rank for ROOT placement: rank 0's arrays, broadcast into buffers
 * that the other ranks allocate and the caller frees (*owned_*). */
PCM_INTERNAL pcm_status pcm_broadcast_parameters(const pcm_mpi *ctx, const void *weight,
                                                 const void *bias, void **weight_out,
                                                 void **bias_out, void **owned_weight,
                                                 void **owned_bias);

/* Local kernels that accept empty arrays (the public entry points reject NULL pointers). */
PCM_INTERNAL pcm_status pcm_local_forward(const pcm_mpi *ctx, const pcm_conv_desc *d,
                                          const void *input, const void *weight,
                                          const void *bias, void *output);
PCM_INTERNAL pcm_status pcm_local_backward_data(const pcm_mpi *ctx, const pcm_conv_desc *d,
                                                const void *grad_output, const void *weight,
                                                void *grad_input);
PCM_INTERNAL pcm_status pcm_local_backward_weight(const pcm_mpi *ctx, const pcm_conv_desc *d,
                                                  const void *grad_output, const void *input,
                                                  void *grad_weight, void *grad_bias);

/* Geometry of global output rows [y0, y1) computed from the global input rows [u, v) alone
 * (rows outside read as zero): a window description for the local kernels. */
PCM_INTERNAL pcm_conv_desc pcm_window_desc(const pcm_conv_desc *global, int64_t n, int64_t u,
                                           int64_t v, int64_t y0, int64_t y1);
/* Global input rows [*lo, *hi) that output rows [y0, y1) read, clipped to the image. */
PCM_INTERNAL void pcm_rows_needed(const pcm_conv_desc *d, int64_t y0, int64_t y1, int64_t *lo,
                                  int64_t *hi);

/* Row decomposition on band arrays (ROWS placement layout over ctx->active ranks): input and
 * output bands are dense [n][c][band rows][w]; grad_weight and grad_bias are summed over the
 * ranks (on rank 0 only when root_only). */
PCM_INTERNAL pcm_status pcm_rows_forward_band(const pcm_mpi *ctx, const void *input_band,
                                              const void *weight, const void *bias,
                                              void *output_band);
PCM_INTERNAL pcm_status pcm_rows_backward_band(const pcm_mpi *ctx, const void *grad_output_band,
                                               const void *input_band, const void *weight,
                                               void *grad_input_band, void *grad_weight,
                                               void *grad_bias, int root_only);

/* Strategy drivers; ctx has been agreed. Arrays follow ctx->placement. */
PCM_INTERNAL pcm_status pcm_rows_forward(const pcm_mpi *ctx, const void *input,
                                         const void *weight, const void *bias, void *output);
PCM_INTERNAL pcm_status pcm_rows_backward(const pcm_mpi *ctx, const void *grad_output,
                                          const void *input, const void *weight,
                                          void *grad_input, void *grad_weight, void *grad_bias);
PCM_INTERNAL pcm_status pcm_grid_forward(const pcm_mpi *ctx, const void *input,
                                         const void *weight, const void *bias, void *output);
PCM_INTERNAL pcm_status pcm_grid_backward(const pcm_mpi *ctx, const void *grad_output,
                                          const void *input, const void *weight,
                                          void *grad_input, void *grad_weight, void *grad_bias);

#define PCM_MPI_TRY(call)                                                                      \
    do {                                                                                       \
        if ((call) != MPI_SUCCESS) {                                                           \
            status = PCM_ERR_MPI;                                                              \
            goto cleanup;                                                                      \
        }                                                                                      \
    } while (0)

#define PCM_TRY(call)                                                                          \
    do {                                                                                       \
        status = (call);                                                                       \
        if (status != PCM_OK)                                                                  \
            goto cleanup;                                                                      \
    } while (0)

#endif /* PYCONVMPI_MPI_INTERNAL_H */
