/* pyconvmpi C API: 2-D convolution forward and backward, local and over MPI.
 *
 * Conventions shared by every function below:
 * - Arrays are dense, C-contiguous and in NCHW / OIHW order:
 *     input[n][c][h][w], weight[k][c / groups][r][s], bias[k],
 *     output[n][k][out_h][out_w].
 * - Convolution is cross-correlation, as in torch.nn.functional.conv2d:
 *     output[n][k][y][x] = bias[k] + sum over (ci, i, j) of
 *         weight[k][ci][i][j] * input[n][g * c / groups + ci][y * stride_h - pad_top + i * dilation_h]
 *                                                        [x * stride_w - pad_left + j * dilation_w]
 *   with g = k / (k_total / groups); input elements outside [0, h) x [0, w) read as zero.
 * - Sizes and strides are int64_t element counts, so a negative value coming from a caller is
 *   detected instead of wrapping around.
 * - The output size is given, not derived: out_h and out_w must not exceed
 *     (h + pad_top + pad_bottom - dilation_h * (r - 1) - 1) / stride_h + 1
 *   for some non-negative pad_bottom; the caller chooses it (PyTorch uses pad_bottom = pad_top,
 *   except for padding="same" with an even effective kernel). pad_top and pad_left may be
 *   negative, which describes a window into a larger image (used by row decompositions).
 * - dtype is PCM_FLOAT32 or PCM_FLOAT64 and applies to every array of a call.
 * - Threads: at most exec->threads OpenMP threads (0: the OpenMP default); the fast kernels use
 *   one thread per 2^18 multiply-adds at most, so tiny calls run on one. Calls on distinct buffers
 *   may run concurrently from several threads; the library keeps no mutable global state
 *   after pcm_simd_level() has filled the dispatch table once.
 * - Nothing here prints, exits, aborts or initialises MPI. Failures are status codes.
 */
#ifndef PYCONVMPI_PCM_H
#define PYCONVMPI_PCM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(PCM_BUILDING_LIBRARY)
#define PCM_API __attribute__((visibility("default")))
#else
#define PCM_API
#endif

/* Raised whenever a signature, enum or struct below changes. */
#define PCM_ABI_VERSION 2

/* Values are fixed forever and only ever appended. */
typedef enum pcm_status {
    PCM_OK = 0,
    PCM_ERR_INVALID_ARGUMENT = 1, /* the caller broke a documented rule */
    PCM_ERR_UNSUPPORTED = 2,      /* a legal request this build does not implement */
    PCM_ERR_OUT_OF_MEMORY = 3,
    PCM_ERR_MPI = 4,              /* an MPI call failed */
    PCM_ERR_INTERNAL = 5,
    PCM_ERR_REMOTE = 6            /* another rank of the communicator reported an error */
} pcm_status;

typedef enum pcm_dtype {
    PCM_FLOAT32 = 0,
    PCM_FLOAT64 = 1
} pcm_dtype;

typedef enum pcm_algorithm {
    PCM_ALGO_AUTO = 0,      /* the library's heuristic */
    PCM_ALGO_DIRECT = 1,    /* direct convolution, register-blocked */
    PCM_ALGO_GEMM = 2,      /* im2col tiles + packed GEMM micro-kernel */
    PCM_ALGO_WINOGRAD = 3,  /* Winograd F(2x2, 3x3); 3x3, stride 1, dilation 1 only */
    PCM_ALGO_REFERENCE = 4  /* plain scalar loops (src/ref), for testing */
} pcm_algorithm;

typedef enum pcm_placement {
    PCM_PLACEMENT_REPLICATED = 0, /* every rank passes the full arrays */
    PCM_PLACEMENT_ROOT = 1,       /* only rank 0 passes data */
    PCM_PLACEMENT_BATCH = 2,      /* each rank passes a slice of the batch */
    PCM_PLACEMENT_ROWS = 3        /* each rank passes a band of rows (pcm_row_band) */
} pcm_placement;

typedef enum pcm_strategy {
    PCM_STRATEGY_BATCH = 1,    /* split the batch */
    PCM_STRATEGY_CHANNELS = 2, /* split output channels */
    PCM_STRATEGY_ROWS = 3,     /* split output rows, exchanging input halos */
    PCM_STRATEGY_HYBRID = 4    /* grid of grid_batch x grid_channels ranks */
} pcm_strategy;

enum {
    PCM_NEED_INPUT = 1,
    PCM_NEED_WEIGHT = 2,
    PCM_NEED_BIAS = 4
};

/* Geometry of one convolution (see the conventions above). All fields are element counts. */
typedef struct pcm_conv_desc {
    int64_t n, c, h, w;        /* input[n][c][h][w] */
    int64_t k, r, s;           /* weight[k][c / groups][r][s] */
    int64_t out_h, out_w;      /* output[n][k][out_h][out_w] */
    int64_t stride_h, stride_w;
    int64_t pad_top, pad_left; /* may be negative (a window into a larger image) */
    int64_t pad_bottom, pad_right; /* used by MPI drivers to derive global sizes; >= 0 */
    int64_t dilation_h, dilation_w;
    int64_t groups;
} pcm_conv_desc;

/* How to run a call. Zero in any field means "choose automatically". */
typedef struct pcm_exec {
    int64_t algorithm; /* pcm_algorithm */
    int64_t threads;   /* max OpenMP threads for this call (tiny calls use fewer) */
    int64_t block_k;   /* max output channels per register tile (rounded down to a built tile) */
    int64_t block_c;   /* input channels per cache block */
    int64_t block_w;   /* max output columns per register tile (rounded down likewise) */
} pcm_exec;

/* Return a static, never-NULL description of a status; unknown numbers get a fixed text. */
PCM_API const char *pcm_strerror(int status);
/* Return the library version, equal to pyconvmpi.__version__. */
PCM_API const char *pcm_version(void);
/* Return PCM_ABI_VERSION as compiled into the library. */
PCM_API int pcm_abi_version(void);
/* Return sizeof(pcm_conv_desc) and sizeof(pcm_exec), so bindings can check their mirror. */
PCM_API int64_t pcm_sizeof_conv_desc(void);
PCM_API int64_t pcm_sizeof_exec(void);
/* Return the SIMD level the kernels dispatch to: "avx512", "avx2" or "scalar". */
PCM_API const char *pcm_simd_level(void);
/* Return the OpenMP thread count a call with exec->threads == 0 uses. */
PCM_API int pcm_default_threads(void);
/* Copy MPI_Get_library_version's text into buffer_out (NUL-terminated, truncated to size).
 * Returns PCM_ERR_INVALID_ARGUMENT for a NULL buffer or size < 1, PCM_ERR_MPI on failure. */
PCM_API pcm_status pcm_mpi_library_version(char *buffer_out, int64_t size);

/* Return whether an algorithm can compute this geometry (1) or not (0); the AUTO value
 * always returns 1 for a valid geometry. op: 0 forward, 1 backward data, 2 backward weight. */
PCM_API int pcm_algorithm_supported(int64_t algorithm, int op, const pcm_conv_desc *desc);

/* Store in *algorithm_out the algorithm (never AUTO) that a local call of operation op with this
 * exec runs. Returns PCM_ERR_INVALID_ARGUMENT for an invalid geometry, op or exec, or a NULL
 * output, and PCM_ERR_UNSUPPORTED if the requested algorithm cannot compute this geometry. */
PCM_API pcm_status pcm_choose_algorithm(int op, const pcm_conv_desc *desc, const pcm_exec *exec,
                                        int64_t *algorithm_out);

/* Measure the multiply-add peak of the kernels' SIMD level: `threads` threads (0: the OpenMP
 * default) each run independent vector FMA chains for about `seconds` seconds (at most 10);
 * *gflops_out is the sum of their rates in GFLOP/s (2 FLOP per multiply-add and lane).
 * Returns PCM_ERR_INVALID_ARGUMENT for a bad dtype, threads < 0, seconds outside (0, 10] or a
 * NULL output. */
PCM_API pcm_status pcm_peak_gflops(int dtype, int64_t threads, double seconds,
                                   double *gflops_out);

/* Forward convolution on this process.
 * output[n][k][out_h][out_w] is overwritten; bias may be NULL (no bias).
 * Returns PCM_ERR_INVALID_ARGUMENT for a NULL array, a bad dtype or an inconsistent geometry,
 * PCM_ERR_UNSUPPORTED if exec->algorithm cannot compute this geometry,
 * PCM_ERR_OUT_OF_MEMORY if a workspace could not be allocated. */
PCM_API pcm_status pcm_conv2d_forward(int dtype, const pcm_conv_desc *desc, const pcm_exec *exec,
                                      const void *input, const void *weight, const void *bias,
                                      void *output);

/* Gradient of the forward convolution with respect to its input.
 * grad_input[n][c][h][w] is overwritten; elements no output depends on become exactly zero.
 * Statuses as for pcm_conv2d_forward. */
PCM_API pcm_status pcm_conv2d_backward_data(int dtype, const pcm_conv_desc *desc,
                                            const pcm_exec *exec, const void *grad_output,
                                            const void *weight, void *grad_input);

/* Gradients with respect to weight and bias, summed over the batch.
 * grad_weight[k][c / groups][r][s] and grad_bias[k] are overwritten; either may be NULL
 * (not computed) but not both. Statuses as for pcm_conv2d_forward. */
PCM_API pcm_status pcm_conv2d_backward_weight(int dtype, const pcm_conv_desc *desc,
                                              const pcm_exec *exec, const void *grad_output,
                                              const void *input, void *grad_weight,
                                              void *grad_bias);

/* Band of rows [*start_out, *stop_out) that rank `rank` of `ranks` owns out of `rows` rows:
 * the first rows % ranks ranks get one row more. Used for the "rows" placement of both input
 * and output rows. Returns PCM_ERR_INVALID_ARGUMENT for ranks < 1, rank outside [0, ranks),
 * rows < 0 or NULL outputs. */
PCM_API pcm_status pcm_row_band(int64_t rows, int64_t ranks, int64_t rank, int64_t *start_out,
                                int64_t *stop_out);

/* Distributed forward convolution: a collective call over the communicator whose Fortran handle
 * is comm_f (Python: comm.py2f()); every rank calls it with the same arguments except the arrays.
 * desc describes the global convolution except for the placement's local part:
 * - REPLICATED: every rank passes all arrays and receives the full output;
 * - ROOT: rank 0 passes all arrays and receives the output, others pass NULL everywhere;
 * - BATCH: desc->n is this rank's batch slice (may differ between ranks, may be 0); input and
 *   output hold that slice; weight and bias are full on every rank;
 * - ROWS: desc->h and desc->out_h are global; input holds this rank's input band and output its
 *   output band, both given by pcm_row_band over desc->h and desc->out_h.
 * strategy, grid_batch and grid_channels apply to REPLICATED and ROOT; active_ranks (0: all)
 * limits how many ranks compute. The communicator is duplicated for the call with
 * MPI_ERRORS_RETURN. Every rank returns the same status: an error on one rank is agreed on
 * before any data moves, so no rank is left waiting.
 * Returns the statuses of pcm_conv2d_forward, PCM_ERR_MPI, or PCM_ERR_REMOTE on ranks whose own
 * part succeeded while another rank's failed. */
PCM_API pcm_status pcm_mpi_conv2d_forward(int comm_f, int placement, int strategy,
                                          int64_t grid_batch, int64_t grid_channels,
                                          int64_t active_ranks, int dtype,
                                          const pcm_conv_desc *desc, const pcm_exec *exec,
                                          const void *input, const void *weight,
                                          const void *bias, void *output);

/* Distributed backward pass, collective like pcm_mpi_conv2d_forward. need is a bit mask of
 * PCM_NEED_INPUT, PCM_NEED_WEIGHT and PCM_NEED_BIAS, equal on every rank; a gradient not needed
 * is not computed and its pointer may be NULL.
 * grad_weight and grad_bias are full and identical on every rank that receives them (all ranks,
 * except ROOT placement where only rank 0 does); grad_input follows the placement like input. */
PCM_API pcm_status pcm_mpi_conv2d_backward(int comm_f, int placement, int strategy,
                                           int64_t grid_batch, int64_t grid_channels,
                                           int64_t active_ranks, int dtype, int need,
                                           const pcm_conv_desc *desc, const pcm_exec *exec,
                                           const void *grad_output, const void *input,
                                           const void *weight, void *grad_input,
                                           void *grad_weight, void *grad_bias);

#ifdef __cplusplus
}
#endif

#endif /* PYCONVMPI_PCM_H */
