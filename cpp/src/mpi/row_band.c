#include "pcm_internal.h"

pcm_status pcm_row_band(int64_t rows, int64_t ranks, int64_t rank, int64_t *start_out,
                        int64_t *stop_out)
{
    if (rows < 0 || ranks < 1 || rank < 0 || rank >= ranks || start_out == NULL ||
        stop_out == NULL)
        return PCM_ERR_INVALID_ARGUMENT;

    const int64_t base = rows / ranks, extra = rows % ranks;
    *start_out = rank * base + pcm_min64(rank, extra);
    *stop_out = *start_out + base + (rank < extra ? 1 : 0);
    return PCM_OK;
}
