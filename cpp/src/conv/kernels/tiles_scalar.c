/* Portable tile kernels: one element per "vector", built without ISA flags, so the library
 * runs on any 64-bit CPU. A masked load reads its element only when the mask is set. */
#include "tiles.h"

#define ISA_NAME "scalar"

#define TILES(X) X(4, 4) X(2, 4) X(1, 8) X(8, 2)
#define DOTS(X) X(2, 4) X(1, 8)

#define T float
#define SFX f32_scalar
#define VL 1
#define VEC float
#define MASK int
#define V_ZERO() 0.0f
#define V_SET1(x) (x)
#define V_LOADU(p) (*(p))
#define V_MLOAD(p, m) ((m) ? *(p) : 0.0f)
#define V_MSTORE(p, m, v) do { if (m) *(p) = (v); } while (0)
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_ADD(a, b) ((a) + (b))
#define V_REDUCE(v) ((double)(v))
#define V_MASK(lo, hi) ((lo) <= 0 && (hi) > 0)
#include "tiles.inc"
#undef T
#undef SFX
#undef VEC
#undef V_ZERO
#undef V_MLOAD
#undef V_REDUCE

#define T double
#define SFX f64_scalar
#define VEC double
#define V_ZERO() 0.0
#define V_MLOAD(p, m) ((m) ? *(p) : 0.0)
#define V_REDUCE(v) (v)
#include "tiles.inc"
