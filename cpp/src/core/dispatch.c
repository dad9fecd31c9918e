/* CPU-feature detection and the choice of tile kernels. The level is computed once and
 * read-only afterwards; it is the library's only global state.
 *
 * PYCONVMPI_SIMD=scalar|avx2|avx512 in the environment caps the level (never raises it above
 * what the CPU supports), so that the portable and AVX2 kernels can be tested on a newer CPU. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "pyconvmpi/pcm.h"
#include "pcm_internal.h"
#include "conv/kernels/tiles.h"

static _Atomic int detected_level = -1;

static int cpu_level(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma"))
        return PCM_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PCM_SIMD_AVX2;
#endif
    return PCM_SIMD_SCALAR;
}

static int detect_level(void)
{
    int level = cpu_level();
    const char *cap = getenv("PYCONVMPI_SIMD");
    if (cap != NULL) {
        int limit = level;
        if (strcmp(cap, "scalar") == 0)
            limit = PCM_SIMD_SCALAR;
        else if (strcmp(cap, "avx2") == 0)
            limit = PCM_SIMD_AVX2;
        if (limit < level)
            level = limit;
    }
    return level;
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

const pcm_tile_set *pcm_tiles(int dtype)
{
    const int f64 = dtype == PCM_FLOAT64;
#if defined(__x86_64__)
    switch (pcm_simd()) {
    case PCM_SIMD_AVX512: return f64 ? &pcm_tiles_f64_avx512 : &pcm_tiles_f32_avx512;
    case PCM_SIMD_AVX2: return f64 ? &pcm_tiles_f64_avx2 : &pcm_tiles_f32_avx2;
    default: break;
    }
#endif
    return f64 ? &pcm_tiles_f64_scalar : &pcm_tiles_f32_scalar;
}
