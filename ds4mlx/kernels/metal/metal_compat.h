// C++ stand-in for the subset of the Metal Shading Language our kernels use, so the same
// kernel sources compile with g++ and run on the CPU (ds4mlx/kernels/emu.py).
//
// The subset: address-space qualifiers (device, constant, thread, threadgroup), scalar types
// incl. half and bfloat, 2/3/4-vectors, as_type, the math functions below, simd_sum / simd_max /
// simd_min / simd_shuffle* / simd_broadcast / simd_prefix_*_sum, threadgroup_barrier,
// simdgroup_barrier, the 8 x 8 simdgroup matrices (load, store, multiply(_accumulate)), and
// atomic_int / atomic_uint with the *_explicit functions and atomic_thread_fence (Metal 3.2).
// Declare threadgroup arrays at kernel scope on a line of their own (`threadgroup float
// tile[64];`): the harness turns those into storage in the threadgroup arena of emu_runtime.h
// (32 KB, poisoned per threadgroup). Every lane of a threadgroup runs as a fiber, so barriers
// and simd collectives synchronise exactly as on the GPU, and divergent barriers are reported.
//
// Address spaces: the build (g++) defines the qualifiers away; the syntax pass of emu.py
// compiles the same text with clang and -DMTLEMU_ADDRESS_SPACES, where they are clang address
// spaces, so a pointer handed to a helper of another address space (a `constant` input where a
// `device` pointer is expected, a threadgroup array where a `thread` pointer is) fails to
// compile as it does in Metal.
//
// Math: precise:: is the host libm (correctly rounded or nearly); fast:: and the unqualified
// functions return the libm result moved by up to MTLEMU_FAST_ULP ulp (a deterministic function
// of the argument), the error Metal's fast math may add. MLX compiles with fast math off today,
// but a kernel whose result must not move belongs on precise:: rather than on a compile option.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef uint64_t ulong;
typedef _Float16 half;

// ------------------------------------------------------------------------------- bfloat
#ifdef MTLEMU_ADDRESS_SPACES
// The syntax pass only type-checks: clang's scalar __bf16 stands in, since a class type cannot be
// read through an address-space pointer without address-space-qualified members.
typedef __bf16 bfloat;
#else
// Storage is the upper 16 bits of a float32; float -> bfloat rounds to nearest even.
// bfloat op bfloat gives bfloat (computed in float, rounded once, as on the GPU); mixed
// operations go through the implicit conversion to float.
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  template <typename U, typename = typename std::enable_if<std::is_arithmetic<U>::value>::type>
  bfloat(U v) : bits_(from_float(static_cast<float>(v))) {}
  bfloat(half v) : bits_(from_float(static_cast<float>(v))) {}
  operator float() const {
    uint32_t u = uint32_t(bits_) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};
#define DS4EMU_BF_OP(op)                                                                  \
  template <typename A, typename B,                                                       \
            typename = typename std::enable_if<std::is_same<A, bfloat>::value &&          \
                                               std::is_same<B, bfloat>::value>::type>     \
  inline bfloat operator op(A a, B b) { return bfloat(float(a) op float(b)); }
DS4EMU_BF_OP(+)
DS4EMU_BF_OP(-)
DS4EMU_BF_OP(*)
DS4EMU_BF_OP(/)
#undef DS4EMU_BF_OP
inline bfloat operator-(bfloat a) { return bfloat(-float(a)); }
template <typename U> inline bfloat& operator+=(bfloat& a, U b) { return a = bfloat(float(a) + float(b)); }
template <typename U> inline bfloat& operator-=(bfloat& a, U b) { return a = bfloat(float(a) - float(b)); }
template <typename U> inline bfloat& operator*=(bfloat& a, U b) { return a = bfloat(float(a) * float(b)); }
template <typename U> inline bfloat& operator/=(bfloat& a, U b) { return a = bfloat(float(a) / float(b)); }
#endif

// ------------------------------------------------------------------------------- vectors
template <typename T, int N> struct vec;
template <typename T> struct vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  template <typename U> explicit vec(const vec<U, 2>& o) : x(T(o.x)), y(T(o.y)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <typename T> struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  template <typename U> explicit vec(const vec<U, 3>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <typename T> struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  template <typename U>
  explicit vec(const vec<U, 4>& o) : x(T(o.x)), y(T(o.y)), z(T(o.z)), w(T(o.w)) {}
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
#define DS4EMU_VEC_OP(op)                                                                  \
  template <typename T, int N> inline vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) { \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b[i];                                       \
    return a;                                                                              \
  }                                                                                        \
  template <typename T, int N> inline vec<T, N> operator op(vec<T, N> a, T b) {            \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b;                                          \
    return a;                                                                              \
  }                                                                                        \
  template <typename T, int N> inline vec<T, N> operator op(T a, vec<T, N> b) {            \
    for (int i = 0; i < N; ++i) b[i] = a op b[i];                                          \
    return b;                                                                              \
  }                                                                                        \
  template <typename T, int N, typename U>                                                 \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const U& b) { return a = a op b; }
DS4EMU_VEC_OP(+)
DS4EMU_VEC_OP(-)
DS4EMU_VEC_OP(*)
DS4EMU_VEC_OP(/)
#undef DS4EMU_VEC_OP
template <typename T, int N> inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s += a[i] * b[i];
  return s;
}

#define DS4EMU_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;      \
  typedef vec<T, 3> name##3;      \
  typedef vec<T, 4> name##4;
DS4EMU_VEC_TYPES(float, float)
DS4EMU_VEC_TYPES(half, half)
DS4EMU_VEC_TYPES(bfloat, bfloat)
DS4EMU_VEC_TYPES(int, int)
DS4EMU_VEC_TYPES(uint, uint)
DS4EMU_VEC_TYPES(short, short)
DS4EMU_VEC_TYPES(ushort, ushort)
DS4EMU_VEC_TYPES(char, char)
DS4EMU_VEC_TYPES(uchar, uchar)
DS4EMU_VEC_TYPES(ulong, ulong)
#undef DS4EMU_VEC_TYPES

}  // namespace metal

#include "emu_runtime.h"  // before the macros below: they would break <thread>

#ifdef MTLEMU_ADDRESS_SPACES
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define thread
#define METAL_FUNC inline

namespace metal {

// ------------------------------------------------------------------------------- as_type
template <typename To, typename From> inline To as_type(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// ------------------------------------------------------------------------------- math
#ifndef MTLEMU_FAST_ULP
#define MTLEMU_FAST_ULP 4
#endif
// libm's result moved by -MTLEMU_FAST_ULP..+MTLEMU_FAST_ULP ulp, chosen by a hash of the
// argument's bits (0 for exact zeros, infinities and NaNs, which fast math keeps).
inline float fast_perturb(float r, float x) {
  uint32_t rb, xb;
  memcpy(&rb, &r, 4);
  memcpy(&xb, &x, 4);
  if ((rb & 0x7fffffffu) == 0 || (rb & 0x7f800000u) == 0x7f800000u) return r;
  uint32_t h = xb * 0x9E3779B1u;
  h ^= h >> 15;
  h *= 0x85EBCA77u;
  h ^= h >> 13;
  int steps = int(h % uint32_t(2 * MTLEMU_FAST_ULP + 1)) - MTLEMU_FAST_ULP;
  uint32_t mag = rb & 0x7fffffffu;
  int64_t moved = int64_t(mag) + steps;
  if (moved < 1) moved = 1;
  if (moved >= 0x7f800000) moved = 0x7f7fffff;
  rb = (rb & 0x80000000u) | uint32_t(moved);
  memcpy(&r, &rb, 4);
  return r;
}
inline float rsqrt_exact(float x) { return 1.0f / __builtin_sqrtf(x); }

// Float math in float32 (half/bfloat arguments are widened and the result narrowed back).
#define DS4EMU_MATH1(name, impl, wrap)                                            \
  inline float name(float x) { return wrap(impl(x), x); }                        \
  inline half name(half x) { return half(wrap(impl(float(x)), float(x))); }      \
  inline bfloat name(bfloat x) { return bfloat(wrap(impl(float(x)), float(x))); }
#define DS4EMU_EXACT(r, x) (r)
#define DS4EMU_TRANSCENDENTALS(wrap)              \
  DS4EMU_MATH1(exp, __builtin_expf, wrap)         \
  DS4EMU_MATH1(exp2, __builtin_exp2f, wrap)       \
  DS4EMU_MATH1(log, __builtin_logf, wrap)         \
  DS4EMU_MATH1(log2, __builtin_log2f, wrap)       \
  DS4EMU_MATH1(sqrt, __builtin_sqrtf, wrap)       \
  DS4EMU_MATH1(rsqrt, rsqrt_exact, wrap)          \
  DS4EMU_MATH1(tanh, __builtin_tanhf, wrap)       \
  DS4EMU_MATH1(sin, __builtin_sinf, wrap)         \
  DS4EMU_MATH1(cos, __builtin_cosf, wrap)         \
  inline float pow(float a, float b) { return wrap(__builtin_powf(a, b), a * 3.0f + b); }
namespace precise {
DS4EMU_TRANSCENDENTALS(DS4EMU_EXACT)
}  // namespace precise
namespace fast {
DS4EMU_TRANSCENDENTALS(fast_perturb)
}  // namespace fast
using fast::exp; using fast::exp2; using fast::log; using fast::log2; using fast::sqrt;
using fast::rsqrt; using fast::tanh; using fast::sin; using fast::cos; using fast::pow;
#undef DS4EMU_TRANSCENDENTALS
#undef DS4EMU_EXACT
#define DS4EMU_EXACT(r, x) (r)
// Exact in Metal as well (no rounding error to model).
DS4EMU_MATH1(floor, __builtin_floorf, DS4EMU_EXACT)
DS4EMU_MATH1(ceil, __builtin_ceilf, DS4EMU_EXACT)
DS4EMU_MATH1(round, __builtin_roundf, DS4EMU_EXACT)
DS4EMU_MATH1(rint, __builtin_rintf, DS4EMU_EXACT)
DS4EMU_MATH1(trunc, __builtin_truncf, DS4EMU_EXACT)
DS4EMU_MATH1(fabs, __builtin_fabsf, DS4EMU_EXACT)
#undef DS4EMU_EXACT
#undef DS4EMU_MATH1
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(__builtin_fabsf(float(x))); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
// Metal's min/max/clamp for floats are fmin/fmax-like (a NaN operand yields the other one).
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline half min(half a, half b) { return half(__builtin_fminf(float(a), float(b))); }
inline half max(half a, half b) { return half(__builtin_fmaxf(float(a), float(b))); }
template <typename T, typename = typename std::enable_if<std::is_integral<T>::value>::type>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T, typename = typename std::enable_if<std::is_integral<T>::value>::type>
inline T max(T a, T b) { return a < b ? b : a; }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
template <typename T, typename = typename std::enable_if<std::is_integral<T>::value>::type>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> inline T select(T a, T b, bool c) { return c ? b : a; }
inline float mix(float a, float b, float t) { return a + (b - a) * t; }
inline float sign(float x) { return x > 0 ? 1.0f : (x < 0 ? -1.0f : 0.0f); }
inline uint popcount(uint x) { return uint(__builtin_popcount(x)); }
inline uint popcount(ushort x) { return uint(__builtin_popcount(uint(x))); }
inline uint popcount(uchar x) { return uint(__builtin_popcount(uint(x))); }

// ------------------------------------------------------------------------------- sync
enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
inline void threadgroup_barrier(mem_flags) { mtlemu::threadgroup_barrier(); }
inline void simdgroup_barrier(mem_flags) { mtlemu::simd_exchange<int>(0, mtlemu::OP_BARRIER); }

// ------------------------------------------------------------------------------- atomics
// atomic_int / atomic_uint in device or threadgroup memory and atomic_thread_fence, as Metal
// 3.2 has them: the atomic functions take memory_order_relaxed only (anything else stops the
// lane with an error), ordering across threadgroups comes from atomic_thread_fence. Threadgroups
// run on several OS threads, so these are real atomics; x86 orders memory more strongly than a
// GPU, so a missing fence does not show here (see kernels/dispatch.py counters for the pattern).
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
enum thread_scope { thread_scope_thread = 0, thread_scope_threadgroup = 1, thread_scope_device = 2,
                    thread_scope_simdgroup = 4 };
template <typename T> struct atomic {
  static_assert(std::is_same<T, int>::value || std::is_same<T, uint>::value,
                "the emulator has atomic_int and atomic_uint");
  T v_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
template <typename T> struct ds4emu_same { typedef T type; };  // operands do not deduce T
#ifdef MTLEMU_ADDRESS_SPACES
// type-checked only: declarations per address space Metal allows (device, threadgroup)
#define DS4EMU_ATOMICS(SPACE)                                                                   \
  template <typename T>                                                                         \
  T atomic_load_explicit(const volatile SPACE atomic<T>* object, memory_order order);           \
  template <typename T>                                                                         \
  void atomic_store_explicit(volatile SPACE atomic<T>* object,                                  \
                             typename ds4emu_same<T>::type desired, memory_order order);        \
  template <typename T>                                                                         \
  T atomic_exchange_explicit(volatile SPACE atomic<T>* object,                                  \
                             typename ds4emu_same<T>::type desired, memory_order order);        \
  template <typename T>                                                                         \
  T atomic_fetch_add_explicit(volatile SPACE atomic<T>* object,                                 \
                              typename ds4emu_same<T>::type operand, memory_order order);       \
  template <typename T>                                                                         \
  T atomic_fetch_sub_explicit(volatile SPACE atomic<T>* object,                                 \
                              typename ds4emu_same<T>::type operand, memory_order order);       \
  template <typename T>                                                                         \
  T atomic_fetch_max_explicit(volatile SPACE atomic<T>* object,                                 \
                              typename ds4emu_same<T>::type operand, memory_order order);       \
  template <typename T>                                                                         \
  T atomic_fetch_min_explicit(volatile SPACE atomic<T>* object,                                 \
                              typename ds4emu_same<T>::type operand, memory_order order);
DS4EMU_ATOMICS(device)
DS4EMU_ATOMICS(threadgroup)
#undef DS4EMU_ATOMICS
void atomic_thread_fence(mem_flags flags, memory_order order,
                         thread_scope scope = thread_scope_device);
#else
inline void ds4emu_relaxed(memory_order order, const char* what) {
  if (order != memory_order_relaxed) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: Metal's atomic functions take memory_order_relaxed only "
             "(order with atomic_thread_fence)", what);
    mtlemu::lane_abort(msg);
  }
}
template <typename T>
inline T atomic_load_explicit(const volatile atomic<T>* object, memory_order order) {
  ds4emu_relaxed(order, "atomic_load_explicit");
  return __atomic_load_n(&object->v_, __ATOMIC_RELAXED);
}
template <typename T>
inline void atomic_store_explicit(volatile atomic<T>* object, typename ds4emu_same<T>::type desired,
                                  memory_order order) {
  ds4emu_relaxed(order, "atomic_store_explicit");
  __atomic_store_n(&object->v_, desired, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomic_exchange_explicit(volatile atomic<T>* object, typename ds4emu_same<T>::type desired,
                                  memory_order order) {
  ds4emu_relaxed(order, "atomic_exchange_explicit");
  return __atomic_exchange_n(&object->v_, desired, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomic_fetch_add_explicit(volatile atomic<T>* object,
                                   typename ds4emu_same<T>::type operand, memory_order order) {
  ds4emu_relaxed(order, "atomic_fetch_add_explicit");
  return __atomic_fetch_add(&object->v_, operand, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomic_fetch_sub_explicit(volatile atomic<T>* object,
                                   typename ds4emu_same<T>::type operand, memory_order order) {
  ds4emu_relaxed(order, "atomic_fetch_sub_explicit");
  return __atomic_fetch_sub(&object->v_, operand, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomic_fetch_max_explicit(volatile atomic<T>* object,
                                   typename ds4emu_same<T>::type operand, memory_order order) {
  ds4emu_relaxed(order, "atomic_fetch_max_explicit");
  T old = __atomic_load_n(&object->v_, __ATOMIC_RELAXED);
  while (old < operand && !__atomic_compare_exchange_n(&object->v_, &old, operand, true,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomic_fetch_min_explicit(volatile atomic<T>* object,
                                   typename ds4emu_same<T>::type operand, memory_order order) {
  ds4emu_relaxed(order, "atomic_fetch_min_explicit");
  T old = __atomic_load_n(&object->v_, __ATOMIC_RELAXED);
  while (operand < old && !__atomic_compare_exchange_n(&object->v_, &old, operand, true,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
// Metal 3.2's fence (MLX compiles with 3.2 from macOS 15); a full fence here.
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
#endif

// ------------------------------------------------------------------------------- simd
// Reductions combine the active lanes pairwise (lanes i and i^16, then ^8, ..., ^1), the
// butterfly order a GPU reduction uses; inactive lanes (returned) contribute nothing.
template <typename T, typename F> inline T simd_reduce(T v, int op, F combine) {
  const mtlemu::SimdView<T> s = mtlemu::simd_exchange<T>(v, op);
  T vals[32];
  bool have[32];
  for (int i = 0; i < 32; ++i) {
    have[i] = (s.mask >> i) & 1u;
    if (have[i]) vals[i] = s.values[i];
  }
  for (int step = 16; step >= 1; step >>= 1)
    for (int i = 0; i < step; ++i) {
      int j = i + step;
      if (have[i] && have[j]) vals[i] = combine(vals[i], vals[j]);
      else if (have[j]) { vals[i] = vals[j]; have[i] = true; }
    }
  return vals[0];
}
template <typename T> inline T simd_sum(T v) {
  return simd_reduce(v, mtlemu::OP_SUM, [](T a, T b) { return T(a + b); });
}
template <typename T> inline T simd_max(T v) {
  return simd_reduce(v, mtlemu::OP_MAX, [](T a, T b) { return max(a, b); });
}
template <typename T> inline T simd_min(T v) {
  return simd_reduce(v, mtlemu::OP_MIN, [](T a, T b) { return min(a, b); });
}
template <typename T, typename F> inline T simd_pick(T v, int op, F src_of) {
  const mtlemu::SimdView<T> s = mtlemu::simd_exchange<T>(v, op);
  int src = src_of(int(s.lane));
  if (src < 0 || src >= 32 || !((s.mask >> src) & 1u)) return v;  // undefined on the GPU
  return s.values[src];
}
template <typename T> inline T simd_shuffle(T v, ushort lane) {
  return simd_pick(v, mtlemu::OP_SHUFFLE, [lane](int) { return int(lane); });
}
template <typename T> inline T simd_broadcast(T v, ushort lane) {
  return simd_pick(v, mtlemu::OP_SHUFFLE, [lane](int) { return int(lane); });
}
template <typename T> inline T simd_broadcast_first(T v) {
  const mtlemu::SimdView<T> s = mtlemu::simd_exchange<T>(v, mtlemu::OP_SHUFFLE);
  return s.values[__builtin_ctz(s.mask)];
}
template <typename T> inline T simd_shuffle_xor(T v, ushort m) {
  return simd_pick(v, mtlemu::OP_SHUFFLE, [m](int i) { return i ^ int(m); });
}
template <typename T> inline T simd_shuffle_down(T v, ushort d) {
  return simd_pick(v, mtlemu::OP_SHUFFLE, [d](int i) { return i + int(d); });
}
template <typename T> inline T simd_shuffle_up(T v, ushort d) {
  return simd_pick(v, mtlemu::OP_SHUFFLE, [d](int i) { return i - int(d); });
}
template <typename T> inline T simd_prefix_exclusive_sum(T v) {
  const mtlemu::SimdView<T> s = mtlemu::simd_exchange<T>(v, mtlemu::OP_SUM);
  T acc = T(0);
  for (uint i = 0; i < s.lane; ++i)
    if ((s.mask >> i) & 1u) acc = T(acc + s.values[i]);
  return acc;
}
template <typename T> inline T simd_prefix_inclusive_sum(T v) {
  return T(simd_prefix_exclusive_sum(v) + v);
}
inline bool simd_any(bool v) { return simd_max<int>(v ? 1 : 0) != 0; }
inline bool simd_all(bool v) { return simd_min<int>(v ? 1 : 0) != 0; }

// ------------------------------------------------------------------------ simdgroup matrices
// simdgroup_matrix<T, 8, 8> (simdgroup_float8x8, simdgroup_half8x8, simdgroup_bfloat8x8): one
// 8 x 8 matrix spread over the 32 lanes of a simdgroup, two elements per lane: lane l holds row
// (l / 4 & 4) + (l / 2) % 4, columns (l / 4 & 2) * 2 + (l % 2) * 2 and the next one (the Apple
// GPU layout thread_elements() exposes; Metal calls the mapping unspecified). Load, store and
// multiply are collectives of the whole simdgroup (mtlemu::simd_matrix_exchange: all 32 lanes,
// one call site, uniform arguments, else an error). A lane reads (load) or writes (store) its
// two elements when it reaches the call, as its own loads and stores would, so the memory it
// touches must be ordered by barriers as for scalar code (the lane orders catch a missing one).
// Only what Metal offers: 8 x 8, float / half / bfloat, one element type per operation (no
// mixed-precision multiply), threadgroup or device pointers of the matrix's own element type.
// A matrix that was never set holds NaN bytes (it is uninitialized on the GPU); the scalar
// constructor makes a diagonal matrix, as Metal's does (make_filled_simdgroup_matrix fills).
inline int ds4emu_sgm_row(unsigned l) { return int((l >> 2 & 4) + (l >> 1 & 3)); }
inline int ds4emu_sgm_col(unsigned l) { return int((l >> 2 & 2) * 2 + (l & 1) * 2); }
// lane holding element (r, c), the element being thread_elements()[c & 1]
inline unsigned ds4emu_sgm_lane(int r, int c) {
  return unsigned((r & 4) << 2 | (c & 4) << 1 | (r & 3) << 1 | (c >> 1 & 1));
}
inline uint64_t ds4emu_mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h * 0xBF58476D1CE4E5B9ull;
}

template <typename T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal's simdgroup matrices are 8 x 8");
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value ||
                    std::is_same<T, bfloat>::value,
                "simdgroup matrices hold float, half or bfloat");
  vec<T, 2> e_;
  simdgroup_matrix() { memset(&e_, 0xFF, sizeof e_); }
  explicit simdgroup_matrix(T dval) {
    unsigned l = mtlemu::simd_lane();
    int r = ds4emu_sgm_row(l), c = ds4emu_sgm_col(l);
    e_[0] = r == c ? dval : T(0.0f);
    e_[1] = r == c + 1 ? dval : T(0.0f);
  }
  thread vec<T, 2>& thread_elements() { return e_; }
  const thread vec<T, 2>& thread_elements() const { return e_; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Cols, int Rows = Cols>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.e_ = vec<T, 2>(value);
  return m;
}

// Offset of element j (0, 1) of this lane's pair in a load / store with these arguments.
inline ulong ds4emu_sgm_offset(int j, ulong elements_per_row, ulong2 origin, bool transpose) {
  unsigned l = mtlemu::simd_lane();
  ulong r = ulong(ds4emu_sgm_row(l)), c = ulong(ds4emu_sgm_col(l) + j);
  return transpose ? (origin.y + c) * elements_per_row + origin.x + r
                   : (origin.y + r) * elements_per_row + origin.x + c;
}
inline uint64_t ds4emu_sgm_key(const volatile void* p, ulong elements_per_row, ulong2 origin,
                               bool transpose, int line) {
  uint64_t h = ds4emu_mix(uint64_t(line), uint64_t(uintptr_t(p)));
  h = ds4emu_mix(h, elements_per_row);
  h = ds4emu_mix(h, origin.x);
  h = ds4emu_mix(h, origin.y);
  return ds4emu_mix(h, transpose ? 1 : 0);
}
#ifdef MTLEMU_ADDRESS_SPACES
// type-checked only: the syntax pass never runs, so the bounds check can stay out of it
#define DS4EMU_SGM_CHECK(p, n, what) ((void)0)
#define DS4EMU_SGM_KEY(p, epr, o, t, line) uint64_t(line)
#else
#define DS4EMU_SGM_CHECK(p, n, what) mtlemu::check_tg_access(p, n, what)
#define DS4EMU_SGM_KEY(p, epr, o, t, line) ds4emu_sgm_key(p, epr, o, t, line)
#endif

// simdgroup_load / simdgroup_store for one address space (the build erases address spaces, so
// it has one overload; the syntax pass has one per space Metal allows: threadgroup, device).
#define DS4EMU_SGM_MEMORY(SPACE)                                                               \
  template <typename T, int Cols, int Rows>                                                    \
  inline void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const SPACE T* src,    \
                             ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),  \
                             bool transpose_matrix = false, int line_ = __builtin_LINE()) {    \
    vec<T, 2> got;                                                                             \
    for (int j = 0; j < 2; ++j) {                                                              \
      const SPACE T* at =                                                                      \
          src + ds4emu_sgm_offset(j, elements_per_row, matrix_origin, transpose_matrix);       \
      DS4EMU_SGM_CHECK(at, sizeof(T), "simdgroup_load");                                       \
      got[j] = *at;                                                                            \
    }                                                                                          \
    mtlemu::simd_matrix_exchange<int>(                                                         \
        0, DS4EMU_SGM_KEY(src, elements_per_row, matrix_origin, transpose_matrix, line_),      \
        mtlemu::OP_MLOAD, "simdgroup_load");                                                   \
    d.e_ = got;                                                                                \
  }                                                                                            \
  template <typename T, int Cols, int Rows>                                                    \
  inline void simdgroup_store(const thread simdgroup_matrix<T, Cols, Rows>& a, SPACE T* dst,   \
                              ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0), \
                              bool transpose_matrix = false, int line_ = __builtin_LINE()) {   \
    for (int j = 0; j < 2; ++j) {                                                              \
      SPACE T* at =                                                                            \
          dst + ds4emu_sgm_offset(j, elements_per_row, matrix_origin, transpose_matrix);       \
      DS4EMU_SGM_CHECK(at, sizeof(T), "simdgroup_store");                                      \
      *at = a.e_[j];                                                                           \
    }                                                                                          \
    mtlemu::simd_matrix_exchange<int>(                                                         \
        0, DS4EMU_SGM_KEY(dst, elements_per_row, matrix_origin, transpose_matrix, line_),      \
        mtlemu::OP_MSTORE, "simdgroup_store");                                                 \
  }
#ifdef MTLEMU_ADDRESS_SPACES
DS4EMU_SGM_MEMORY(threadgroup)
DS4EMU_SGM_MEMORY(device)
#else
DS4EMU_SGM_MEMORY()
#endif
#undef DS4EMU_SGM_MEMORY

template <typename T> struct ds4emu_sgm_operands {
  vec<T, 2> a, b, c;
};
// d = a * b + c over the simdgroup: each lane gathers row r of a and its two columns of b from
// the lanes holding them and sums in float32, in k order, rounding once to T.
template <typename T>
inline vec<T, 2> ds4emu_sgm_mma(const vec<T, 2>& a, const vec<T, 2>& b, const vec<T, 2>& c,
                                bool accumulate, int line, const char* what) {
  typedef ds4emu_sgm_operands<T> Ops;
  const mtlemu::Slot* all = mtlemu::simd_matrix_exchange(Ops{a, b, c}, uint64_t(line),
                                                         mtlemu::OP_MMA, what);
  unsigned l = mtlemu::simd_lane();
  int r = ds4emu_sgm_row(l), c0 = ds4emu_sgm_col(l);
  vec<T, 2> d;
  for (int j = 0; j < 2; ++j) {
    float acc = accumulate ? float(c[j]) : 0.0f;
    for (int k = 0; k < 8; ++k) {
      const Ops& row = mtlemu::matrix_payload<Ops>(all, int(ds4emu_sgm_lane(r, k)));
      const Ops& col = mtlemu::matrix_payload<Ops>(all, int(ds4emu_sgm_lane(k, c0 + j)));
      acc += float(row.a[k & 1]) * float(col.b[(c0 + j) & 1]);
    }
    d[j] = T(acc);
  }
  return d;
}
template <typename T, int Cols, int Rows, int K>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, Cols, Rows>& d,
                                          const thread simdgroup_matrix<T, K, Rows>& a,
                                          const thread simdgroup_matrix<T, Cols, K>& b,
                                          const thread simdgroup_matrix<T, Cols, Rows>& c,
                                          int line_ = __builtin_LINE()) {
  d.e_ = ds4emu_sgm_mma(a.e_, b.e_, c.e_, true, line_, "simdgroup_multiply_accumulate");
}
template <typename T, int Cols, int Rows, int K>
inline void simdgroup_multiply(thread simdgroup_matrix<T, Cols, Rows>& d,
                               const thread simdgroup_matrix<T, K, Rows>& a,
                               const thread simdgroup_matrix<T, Cols, K>& b,
                               int line_ = __builtin_LINE()) {
  d.e_ = ds4emu_sgm_mma(a.e_, b.e_, b.e_, false, line_, "simdgroup_multiply");
}

}  // namespace metal

using namespace metal;
typedef metal::half float16_t;
typedef metal::bfloat bfloat16_t;
