/* CPU-feature detection. The level is computed once and read-only afterwards; it is the
 * library's only global state. */
#include <stdatomic.h>

#include "pyconvmpi/pcm.h"
#include "pcm_internal.h"

static _Atomic int detected_level = -1;

static int detect_level(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        return PCM_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PCM_SIMD_AVX2;
#endif
    return PCM_SIMD_SCALAR;
}

int pcm_simd(void)
{
    int level = atomic_load_explicit(&detected_level, memory_order_acquire);
    if (level < 0) {
        /* Racing threads compute the same value, so a plain store is enough. */
        level = detect_level();
        atomic_store_explicit(&detected_level, level, memory_order_release);
    }
    return level;
}

const char *pcm_simd_level(void)
{
    switch (pcm_simd()) {
    case PCM_SIMD_AVX512: return "avx512";
    case PCM_SIMD_AVX2: return "avx2";
    default: return "scalar";
    }
}
