/* Comparisons and selects of 64-byte vectors (16 floats or int32, 8 doubles or int64) for the
 * kernels that run one row per lane (built with AVX-512: see kquant_search.c). */
#ifndef DS4MLX_LANES_H
#define DS4MLX_LANES_H
#include <stdint.h>

typedef float lanes_f __attribute__((vector_size(64)));
typedef int32_t lanes_i __attribute__((vector_size(64)));
typedef double lanes_d __attribute__((vector_size(64)));
typedef int64_t lanes_l __attribute__((vector_size(64)));

/* (named, so that a target without 64-byte vectors could compare them piece by piece: GCC
 * compares wider generic vectors element by element, in scalar code) */
#define LANES_CMP(NAME, T, TI, OP) \
    static inline TI NAME(T a, T b) { return a OP b; }
LANES_CMP(f_lt, lanes_f, lanes_i, <)
LANES_CMP(f_gt, lanes_f, lanes_i, >)
LANES_CMP(f_le, lanes_f, lanes_i, <=)
LANES_CMP(f_eq, lanes_f, lanes_i, ==)
LANES_CMP(f_ne, lanes_f, lanes_i, !=)
LANES_CMP(i_lt, lanes_i, lanes_i, <)
LANES_CMP(i_ge, lanes_i, lanes_i, >=)
LANES_CMP(i_eq, lanes_i, lanes_i, ==)
LANES_CMP(d_lt, lanes_d, lanes_l, <)
LANES_CMP(d_gt, lanes_d, lanes_l, >)
LANES_CMP(d_le, lanes_d, lanes_l, <=)
LANES_CMP(d_eq, lanes_d, lanes_l, ==)
LANES_CMP(d_ne, lanes_d, lanes_l, !=)
#undef LANES_CMP

/* m ? a : b lane by lane (m all ones or all zeros) */
static inline lanes_f sel_f(lanes_i m, lanes_f a, lanes_f b) { return (lanes_f)((m & (lanes_i)a) | (~m & (lanes_i)b)); }
static inline lanes_d sel_d(lanes_l m, lanes_d a, lanes_d b) { return (lanes_d)((m & (lanes_l)a) | (~m & (lanes_l)b)); }
#endif
