// CPU runtime for emulated Metal kernels: runs every thread of a dispatch, one fiber per lane of
// a threadgroup, so threadgroup_barrier and the simd collectives synchronise like on the GPU.
//
// A threadgroup runs on one OS thread: its lanes are fibers scheduled round-robin; a lane runs
// until it reaches a barrier or a simd collective, or returns. A simdgroup (32 consecutive lanes)
// is released from a collective once all its live lanes wait there (lanes that returned are
// inactive, as on the GPU); the threadgroup is released from a barrier once all lanes wait there.
// Anything else (lanes waiting at different collectives, a barrier that some lanes skipped) is a
// divergence and is reported as an error. Threadgroups are spread over a few OS threads.
//
// Stricter than the GPU on purpose: threadgroup memory is an arena of Metal's 32 KB limit per
// OS thread, filled with 0xFF bytes at the start of every threadgroup (a GPU does not zero it),
// and the lanes of a threadgroup can be scheduled forward, reversed or shuffled, and the
// threadgroups started in those orders too (the harness compares the results, so a kernel that
// depends on lane order, e.g. a missing barrier after a lane-0 write, or on threadgroup order,
// e.g. reading another threadgroup's output without the counter pattern, is caught).
#pragma once

// Only C headers: every kernel compiles this file, and the C++ standard headers would double
// the compile time.
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(MTLEMU_UCONTEXT)
#define MTLEMU_UCONTEXT 1
#endif
#ifdef MTLEMU_UCONTEXT
#include <ucontext.h>
#endif

namespace metal {
template <typename T, int N> struct vec;
}

namespace mtlemu {

typedef metal::vec<unsigned, 3> uint3_t;

// Everything a kernel may ask for through the attributes mx.fast.metal_kernel generates.
struct LaneIds {
  uint3_t thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3_t threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint3_t dispatch_threads_per_threadgroup, grid_origin, grid_size;
  unsigned thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  unsigned thread_index_in_quadgroup, quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  unsigned dispatch_simdgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

enum { OP_BARRIER = 1, OP_SUM, OP_MAX, OP_MIN, OP_SHUFFLE, OP_MLOAD, OP_MSTORE, OP_MMA };
enum LaneState { READY, WAIT_TG, WAIT_SIMD, DONE };

// ------------------------------------------------------------------------------ contexts
#ifdef MTLEMU_UCONTEXT
struct Ctx { ucontext_t uc; };
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_make(Ctx& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#else
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// continues on `to` (a stack prepared by ctx_make or saved by an earlier switch).
extern "C" void mtlemu_switch(void** from, void* to);
asm(R"(
.text
.globl mtlemu_switch
.hidden mtlemu_switch
.type mtlemu_switch,@function
mtlemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mtlemu_switch,.-mtlemu_switch
)");
struct Ctx { void* sp; };
inline void ctx_switch(Ctx& from, Ctx& to) { mtlemu_switch(&from.sp, to.sp); }
inline void ctx_make(Ctx& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (uintptr_t(stack) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // fake return address: entry starts 16n+8 aligned
  *--sp = reinterpret_cast<void*>(entry);  // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  c.sp = sp;
}
#endif

// ------------------------------------------------------------------------------ scheduler
struct Slot { alignas(16) unsigned char bytes[32]; };

struct Lane {
  Ctx ctx;
  LaneState state;
  int op;
  size_t tg_used;  // threadgroup bytes this lane's declarations have claimed so far
  LaneIds ids;
};

// Metal's threadgroup memory limit (MTLDevice.maxThreadgroupMemoryLength on Apple GPUs).
enum { TG_LIMIT = 32768 };
enum { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_SHUFFLE = 2 };

typedef void (*KernelFn)(void* args, const LaneIds& ids);

struct Group {
  Ctx sched;
  Lane* lanes = nullptr;
  char** stacks = nullptr;
  Slot* slots = nullptr;
  Slot* snapshot = nullptr;
  uint32_t* snapshot_mask = nullptr;
  int capacity = 0;  // lanes with a stack
  size_t stack_size = 0;
  int n = 0, current = 0;
  int* order = nullptr;          // lane scheduling order of the current threadgroup
  unsigned char* arena = nullptr;  // threadgroup memory, TG_LIMIT bytes
  size_t arena_high = 0;           // bytes any threadgroup has claimed (poisoned each time)
  KernelFn fn = nullptr;
  void* args = nullptr;
  char error[256] = {0};

  ~Group() {
    for (int i = 0; i < capacity; ++i) munmap(stacks[i], stack_size + size_t(getpagesize()));
    free(lanes);
    free(stacks);
    free(slots);
    free(snapshot);
    free(snapshot_mask);
    free(order);
    free(arena);
  }
};

inline thread_local Group* tls_group = nullptr;

[[noreturn]] inline void fiber_main() {
  Group* g = tls_group;
  Lane& lane = g->lanes[g->current];
  g->fn(g->args, lane.ids);
  lane.state = DONE;
  ctx_switch(lane.ctx, g->sched);
  __builtin_unreachable();
}

inline void fail(Group* g, const char* msg) {
  if (!g->error[0]) snprintf(g->error, sizeof g->error, "%s", msg);
}

// Parks the current lane in `state` until the scheduler releases it.
inline void park(LaneState state, int op) {
  Group* g = tls_group;
  Lane& lane = g->lanes[g->current];
  lane.state = state;
  lane.op = op;
  ctx_switch(lane.ctx, g->sched);
}

inline void threadgroup_barrier() { park(WAIT_TG, OP_BARRIER); }

// Storage of one `threadgroup` declaration: every lane runs the same declarations in the same
// order, so the k-th one gets the same offset in every lane. Past TG_LIMIT the launch fails
// (Metal refuses such a pipeline) and the lane stops before it can touch the memory.
inline void* tg_alloc(size_t size, size_t align) {
  Group* g = tls_group;
  Lane& lane = g->lanes[g->current];
  size_t at = (lane.tg_used + align - 1) & ~(align - 1);
  if (at + size > size_t(TG_LIMIT)) {
    char msg[200];
    snprintf(msg, sizeof msg,
             "threadgroup memory: the declarations need %zu bytes, over Metal's %d-byte limit",
             at + size, int(TG_LIMIT));
    fail(g, msg);
    lane.state = DONE;
    ctx_switch(lane.ctx, g->sched);
    __builtin_unreachable();
  }
  lane.tg_used = at + size;
  if (lane.tg_used > g->arena_high) g->arena_high = lane.tg_used;
  return g->arena + at;
}

template <typename T> struct SimdView {
  const T* values;  // one per lane of the simdgroup (valid where mask has the bit)
  uint32_t mask;    // lanes taking part
  unsigned lane;    // the caller's lane
};

// Publishes `v`, waits for the simdgroup's live lanes, returns what every lane published.
template <typename T> inline SimdView<T> simd_exchange(T v, int op) {
  static_assert(sizeof(T) <= sizeof(Slot), "simd value too large");
  Group* g = tls_group;
  int i = g->current;
  memcpy(g->slots[i].bytes, &v, sizeof(T));
  park(WAIT_SIMD, op);
  g = tls_group;
  int base = i & ~31;
  static thread_local T values[32];
  for (int j = 0; j < 32 && base + j < g->n; ++j)
    memcpy(&values[j], g->snapshot[base + j].bytes, sizeof(T));
  return SimdView<T>{values, g->snapshot_mask[i >> 5], unsigned(i & 31)};
}

// Stops the calling lane and fails the launch with `msg` (the lane never resumes, so it cannot
// go on with a wrong value).
[[noreturn]] inline void lane_abort(const char* msg) {
  Group* g = tls_group;
  fail(g, msg);
  Lane& lane = g->lanes[g->current];
  lane.state = DONE;
  ctx_switch(lane.ctx, g->sched);
  __builtin_unreachable();
}

inline unsigned simd_lane() { return unsigned(tls_group->current & 31); }

// Bounds of a threadgroup access: an address inside the arena must lie in what the kernel's
// threadgroup declarations claimed (device and thread addresses are not checked here).
inline void check_tg_access(const void* p, size_t size, const char* what) {
  Group* g = tls_group;
  const unsigned char* b = static_cast<const unsigned char*>(p);
  if (b < g->arena || b >= g->arena + TG_LIMIT) return;
  size_t at = size_t(b - g->arena);
  if (at + size > g->lanes[g->current].tg_used) {
    char msg[200];
    snprintf(msg, sizeof msg, "%s: threadgroup access at byte %zu, past the %zu bytes the "
             "threadgroup declarations hold", what, at, g->lanes[g->current].tg_used);
    lane_abort(msg);
  }
}

// One simdgroup-matrix operation (simdgroup_load / simdgroup_store / simdgroup_multiply*): a
// collective of the whole simdgroup. All 32 lanes must reach it, from one call site with the same
// uniform arguments (folded into `key` by the caller); a call by a subset of the lanes (a
// divergent branch, lanes that returned, a simdgroup cut short by the threadgroup size) or with
// arguments that differ between lanes is undefined on the GPU and an error here. Publishes `v`;
// returns the simdgroup's 32 messages (matrix_payload reads lane j's), valid until the caller
// reaches its next collective (the simdgroup cannot be released again before that).
template <typename T> struct MatrixMsg {
  uint64_t key;
  T v;
};
template <typename T> inline const T& matrix_payload(const Slot* msgs, int j) {
  return reinterpret_cast<const MatrixMsg<T>*>(msgs[j].bytes)->v;
}
template <typename T>
inline const Slot* simd_matrix_exchange(const T& v, uint64_t key, int op, const char* what) {
  static_assert(sizeof(MatrixMsg<T>) <= sizeof(Slot), "simdgroup matrix payload too large");
  Group* g = tls_group;
  int i = g->current;
  MatrixMsg<T>* mine = reinterpret_cast<MatrixMsg<T>*>(g->slots[i].bytes);
  mine->key = key;
  mine->v = v;
  park(WAIT_SIMD, op);
  g = tls_group;
  int sg = i >> 5;
  const Slot* msgs = g->snapshot + (i & ~31);
  char msg[240];
  uint32_t mask = g->snapshot_mask[sg];
  if (mask != 0xFFFFFFFFu) {
    snprintf(msg, sizeof msg,
             "%s: %d of the 32 lanes of simdgroup %d take part; a simdgroup-matrix operation "
             "needs all of them (no divergent branch, no lane that returned, a full simdgroup)",
             what, __builtin_popcount(mask), sg);
    lane_abort(msg);
  }
  // every lane compares its key with lane 0's: together the 32 lanes check them all
  if (reinterpret_cast<const MatrixMsg<T>*>(msgs[0].bytes)->key != key) {
    snprintf(msg, sizeof msg,
             "%s: the lanes of simdgroup %d reached it from different call sites or with "
             "different arguments (pointer, elements_per_row, matrix_origin, transpose_matrix "
             "must be the same in every lane)", what, sg);
    lane_abort(msg);
  }
  return msgs;
}

inline bool release_simdgroups(Group& g) {
  bool released = false;
  for (int s = 0; s * 32 < g.n; ++s) {
    int lo = s * 32, hi = lo + 32 < g.n ? lo + 32 : g.n;
    int live = 0, waiting = 0, op = -1;
    bool same = true;
    for (int i = lo; i < hi; ++i) {
      if (g.lanes[i].state == DONE) continue;
      ++live;
      if (g.lanes[i].state == WAIT_SIMD) {
        ++waiting;
        if (op >= 0 && g.lanes[i].op != op) same = false;
        op = g.lanes[i].op;
      }
    }
    if (live == 0 || waiting != live) continue;
    if (!same) {
      fail(&g, "divergence: lanes of one simdgroup reached different simd collectives");
      return false;
    }
    uint32_t mask = 0;
    for (int i = lo; i < hi; ++i)
      if (g.lanes[i].state == WAIT_SIMD) {
        mask |= 1u << (i - lo);
        g.snapshot[i] = g.slots[i];
        g.lanes[i].state = READY;
      }
    g.snapshot_mask[s] = mask;
    released = true;
  }
  return released;
}

// Runs one threadgroup to completion; false (and g.error) on divergence.
inline bool run_group(Group& g) {
  memset(g.arena, 0xFF, g.arena_high);  // what an earlier threadgroup left is garbage
  for (int i = 0; i < g.n; ++i) {
    g.lanes[i].state = READY;
    g.lanes[i].tg_used = 0;
    ctx_make(g.lanes[i].ctx, g.stacks[i] + getpagesize(), g.stack_size, fiber_main);
  }
  for (;;) {
    for (int o = 0; o < g.n; ++o) {
      int i = g.order[o];
      if (g.lanes[i].state != READY) continue;
      g.current = i;
      ctx_switch(g.sched, g.lanes[i].ctx);
    }
    if (g.error[0]) return false;
    if (release_simdgroups(g)) continue;
    if (g.error[0]) return false;
    int done = 0, at_barrier = 0;
    for (int i = 0; i < g.n; ++i) {
      done += g.lanes[i].state == DONE;
      at_barrier += g.lanes[i].state == WAIT_TG;
    }
    if (done == g.n) return true;
    if (at_barrier == g.n) {
      for (int i = 0; i < g.n; ++i) g.lanes[i].state = READY;
      continue;
    }
    char msg[160];
    snprintf(msg, sizeof msg,
                  "divergence: %d of %d lanes wait at threadgroup_barrier, %d returned, the others "
                  "wait at a simd collective",
                  at_barrier, g.n, done);
    fail(&g, msg);
    return false;
  }
}

inline void setup_group(Group& g, int max_lanes, size_t stack_size) {
  g.stack_size = stack_size;
  g.lanes = static_cast<Lane*>(calloc(size_t(max_lanes), sizeof(Lane)));
  g.stacks = static_cast<char**>(calloc(size_t(max_lanes), sizeof(char*)));
  g.slots = static_cast<Slot*>(calloc(size_t(max_lanes), sizeof(Slot)));
  g.snapshot = static_cast<Slot*>(calloc(size_t(max_lanes), sizeof(Slot)));
  g.snapshot_mask = static_cast<uint32_t*>(calloc(size_t(max_lanes + 31) / 32, sizeof(uint32_t)));
  g.order = static_cast<int*>(calloc(size_t(max_lanes), sizeof(int)));
  g.arena = static_cast<unsigned char*>(aligned_alloc(64, TG_LIMIT));
  if (g.arena) memset(g.arena, 0xFF, TG_LIMIT);
  if (!g.lanes || !g.stacks || !g.slots || !g.snapshot || !g.snapshot_mask || !g.order ||
      !g.arena) {
    fail(&g, "out of memory for the lanes of a threadgroup");
    return;
  }
  size_t page = size_t(getpagesize());
  for (int i = 0; i < max_lanes; ++i) {
    void* p = mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
      fail(&g, "could not map a fiber stack");
      return;
    }
    mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    g.stacks[i] = static_cast<char*>(p);
    g.capacity = i + 1;
  }
}

inline unsigned div_up(unsigned a, unsigned b) { return (a + b - 1) / b; }

// Lane scheduling order of threadgroup `id`: forward, reversed, or a permutation that depends
// on the threadgroup (xorshift Fisher-Yates, the same on every run).
inline void set_order(int* order, int n, int kind, long long id) {
  for (int i = 0; i < n; ++i) order[i] = kind == ORDER_REVERSE ? n - 1 - i : i;
  if (kind != ORDER_SHUFFLE) return;
  uint64_t s = 0x9E3779B97F4A7C15ull ^ uint64_t(id + 1) * 0xBF58476D1CE4E5B9ull;
  for (int i = n - 1; i > 0; --i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    int j = int(s % uint64_t(i + 1));
    int tmp = order[i];
    order[i] = order[j];
    order[j] = tmp;
  }
}

struct Launch {
  KernelFn fn;
  void* args;
  unsigned grid[3], tg[3], groups[3];
  long long total_groups;
  int max_lanes;
  size_t stack_size;
  int order;        // ORDER_* of the lanes
  int group_order;  // ORDER_* of the threadgroups
  long long* perm;  // the shuffled threadgroup order (ORDER_SHUFFLE), else null
  long long next;   // next threadgroup to run (atomic)
  int failed;      // atomic flag
};

struct Worker {
  Launch* launch;
  Group group;
};

inline void run_worker(Worker& w) {
  Launch& L = *w.launch;
  Group& g = w.group;
  setup_group(g, L.max_lanes, L.stack_size);
  if (g.error[0]) {
    __atomic_store_n(&L.failed, 1, __ATOMIC_SEQ_CST);
    return;
  }
  g.fn = L.fn;
  g.args = L.args;
  tls_group = &g;
  const unsigned* grid = L.grid;
  const unsigned* tg = L.tg;
  const unsigned* groups = L.groups;
  for (;;) {
    long long k = __atomic_fetch_add(&L.next, 1, __ATOMIC_SEQ_CST);
    if (k >= L.total_groups || __atomic_load_n(&L.failed, __ATOMIC_SEQ_CST)) break;
    long long id = L.perm ? L.perm[k] : L.group_order == ORDER_REVERSE ? L.total_groups - 1 - k : k;
    unsigned gp[3] = {unsigned(id % groups[0]), unsigned((id / groups[0]) % groups[1]),
                      unsigned(id / ((long long)groups[0] * groups[1]))};
    unsigned size[3];
    for (int d = 0; d < 3; ++d) {
      unsigned origin = gp[d] * tg[d];
      size[d] = grid[d] - origin < tg[d] ? grid[d] - origin : tg[d];
    }
    g.n = int(size[0] * size[1] * size[2]);
    unsigned n_simd = div_up(unsigned(g.n), 32);
    int i = 0;
    for (unsigned z = 0; z < size[2]; ++z)
      for (unsigned y = 0; y < size[1]; ++y)
        for (unsigned x = 0; x < size[0]; ++x, ++i) {
          LaneIds& t = g.lanes[i].ids;
          t.thread_position_in_threadgroup = uint3_t(x, y, z);
          t.threadgroup_position_in_grid = uint3_t(gp[0], gp[1], gp[2]);
          t.thread_position_in_grid =
              uint3_t(gp[0] * tg[0] + x, gp[1] * tg[1] + y, gp[2] * tg[2] + z);
          t.threads_per_threadgroup = uint3_t(size[0], size[1], size[2]);
          t.dispatch_threads_per_threadgroup = uint3_t(tg[0], tg[1], tg[2]);
          t.threadgroups_per_grid = uint3_t(groups[0], groups[1], groups[2]);
          t.threads_per_grid = uint3_t(grid[0], grid[1], grid[2]);
          t.grid_size = t.threads_per_grid;
          t.grid_origin = uint3_t(0u, 0u, 0u);
          t.thread_index_in_threadgroup = unsigned(i);
          t.thread_index_in_simdgroup = unsigned(i) % 32;
          t.simdgroup_index_in_threadgroup = unsigned(i) / 32;
          t.simdgroups_per_threadgroup = n_simd;
          t.dispatch_simdgroups_per_threadgroup = div_up(unsigned(L.max_lanes), 32);
          t.threads_per_simdgroup = 32;
          t.thread_execution_width = 32;
          t.thread_index_in_quadgroup = unsigned(i) % 4;
          t.quadgroup_index_in_threadgroup = unsigned(i) / 4;
          t.quadgroups_per_threadgroup = div_up(unsigned(g.n), 4);
          t.dispatch_quadgroups_per_threadgroup = div_up(unsigned(L.max_lanes), 4);
        }
    set_order(g.order, g.n, L.order, id);
    if (!run_group(g)) {
      __atomic_store_n(&L.failed, 1, __ATOMIC_SEQ_CST);
      break;
    }
  }
  tls_group = nullptr;
}

inline void* worker_main(void* w) {
  run_worker(*static_cast<Worker*>(w));
  return nullptr;
}

// Threadgroup start order: forward, reversed, or a permutation (xorshift Fisher-Yates, seeded);
// the GPU promises no order, so a kernel whose result depends on it must fail a comparison.
inline long long* group_permutation(long long n, uint64_t seed) {
  long long* p = static_cast<long long*>(malloc(size_t(n) * sizeof(long long)));
  if (!p) return nullptr;
  for (long long i = 0; i < n; ++i) p[i] = i;
  uint64_t s = 0x9E3779B97F4A7C15ull ^ (seed + 1) * 0xBF58476D1CE4E5B9ull;
  for (long long i = n - 1; i > 0; --i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    long long j = (long long)(s % uint64_t(i + 1));
    long long tmp = p[i];
    p[i] = p[j];
    p[j] = tmp;
  }
  return p;
}

// Dispatches grid[3] threads in threadgroups of tg[3] (clamped to the grid, as MLX does; edge
// threadgroups are partial, as with dispatchThreads), the lanes in `order` and the threadgroups
// started in `group_order` (ORDER_*; `seed` picks the shuffle). Returns 0, or 1 with `err` filled.
inline int launch(KernelFn fn, void* args, const long long* grid_in, const long long* tg_in,
                  int workers, long long stack_size, int order, int group_order, long long seed,
                  char* err, int errlen) {
  Launch L = {};
  L.order = order;
  L.group_order = group_order;
  L.fn = fn;
  L.args = args;
  for (int d = 0; d < 3; ++d) {
    L.grid[d] = unsigned(grid_in[d]);
    L.tg[d] = unsigned(tg_in[d] < grid_in[d] ? tg_in[d] : grid_in[d]);
    if (L.tg[d] == 0) L.tg[d] = 1;
    L.groups[d] = L.grid[d] ? div_up(L.grid[d], L.tg[d]) : 0;
  }
  L.total_groups = (long long)L.groups[0] * L.groups[1] * L.groups[2];
  L.max_lanes = int(L.tg[0] * L.tg[1] * L.tg[2]);
  L.stack_size = size_t(stack_size);
  if (L.total_groups == 0) return 0;
  if (workers < 1) workers = 1;
  if (workers > L.total_groups) workers = int(L.total_groups);
  if (group_order == ORDER_SHUFFLE) {
    L.perm = group_permutation(L.total_groups, uint64_t(seed));
    if (!L.perm) {
      snprintf(err, size_t(errlen), "out of memory for the threadgroup order");
      return 1;
    }
  }

  Worker* ws = new Worker[workers];
  pthread_t* threads = new pthread_t[workers];
  for (int w = 0; w < workers; ++w) ws[w].launch = &L;
  int started = 0;
  for (int w = 1; w < workers; ++w, ++started)
    if (pthread_create(&threads[w], nullptr, worker_main, &ws[w]) != 0) break;
  run_worker(ws[0]);  // the calling thread is worker 0
  for (int w = 1; w <= started; ++w) pthread_join(threads[w], nullptr);
  int rc = L.failed ? 1 : 0;
  for (int w = 0; w < workers; ++w)
    if (ws[w].group.error[0]) {
      snprintf(err, size_t(errlen), "%s", ws[w].group.error);
      rc = 1;
      break;
    }
  delete[] ws;
  delete[] threads;
  free(L.perm);
  return rc;
}

}  // namespace mtlemu
