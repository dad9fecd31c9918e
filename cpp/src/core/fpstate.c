/* Denormal handling: kernels run with flush-to-zero and denormals-are-zero set, so a layer
 * full of tiny values does not run 100 times slower, and put the caller's MXCSR back. */
#include "pcm_internal.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
#define PCM_MXCSR_FTZ_DAZ 0x8040u
#endif

void pcm_fp_enter(pcm_fp_state *saved)
{
#if defined(__x86_64__)
    saved->mxcsr = _mm_getcsr();
    _mm_setcsr(saved->mxcsr | PCM_MXCSR_FTZ_DAZ);
#else
    saved->mxcsr = 0;
#endif
}

void pcm_fp_leave(const pcm_fp_state *saved)
{
#if defined(__x86_64__)
    _mm_setcsr(saved->mxcsr);
#else
    (void)saved;
#endif
}
