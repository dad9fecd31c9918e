#include "pyconvmpi/pcm.h"

const char *pcm_strerror(int status)
{
    switch (status) {
    case PCM_OK: return "success";
    case PCM_ERR_INVALID_ARGUMENT: return "invalid argument";
    case PCM_ERR_UNSUPPORTED: return "not supported by this build";
    case PCM_ERR_OUT_OF_MEMORY: return "out of memory";
    case PCM_ERR_MPI: return "MPI call failed";
    case PCM_ERR_INTERNAL: return "internal error";
    case PCM_ERR_REMOTE: return "another rank reported an error";
    default: return "unknown status";
    }
}
