#include <mpi.h>
#include <omp.h>
#include <string.h>

#include "pyconvmpi/pcm.h"
#include "pcm_internal.h"

/* PCM_VERSION_STRING comes from pyconvmpi/_version.py through CMake, the single source. */
const char *pcm_version(void) { return PCM_VERSION_STRING; }

int pcm_abi_version(void) { return PCM_ABI_VERSION; }

int64_t pcm_sizeof_conv_desc(void) { return (int64_t)sizeof(pcm_conv_desc); }

int64_t pcm_sizeof_exec(void) { return (int64_t)sizeof(pcm_exec); }

int pcm_default_threads(void) { return omp_get_max_threads(); }

pcm_status pcm_mpi_library_version(char *buffer_out, int64_t size)
{
    char text[MPI_MAX_LIBRARY_VERSION_STRING];
    int length = 0;

    if (buffer_out == NULL || size < 1)
        return PCM_ERR_INVALID_ARGUMENT;
    /* MPI_Get_library_version may be called before MPI_Init. */
    if (MPI_Get_library_version(text, &length) != MPI_SUCCESS)
        return PCM_ERR_MPI;
    if ((int64_t)length >= size)
        length = (int)(size - 1);
    memcpy(buffer_out, text, (size_t)length);
    buffer_out[length] = '\0';
    return PCM_OK;
}
