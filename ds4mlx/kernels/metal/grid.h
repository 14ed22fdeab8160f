// One launch, several threadgroups, the last one to finish combining their results: the
// "last threadgroup" pattern (ds4mlx/kernels/dispatch.py counter, grid_sync). No threadgroup
// waits for another (the GPU promises no forward progress between them): each writes its
// partial results, fences, counts itself in on a device counter; the one that sees the count
// reach `groups - 1` fences again, reads every partial IN A FIXED ORDER (by threadgroup, not by
// arrival, so the result does not depend on which one was last) and puts the counter back to 0
// for the next launch. atomic_thread_fence needs Metal 3.2 (macOS 15); without it the kernel
// does not compile, the first-use check of the GRID_SYNC variant fails, and the kernels take
// their one-threadgroup form.
//
// The partials go through atomic loads and stores (of the float's bits): atomic accesses are
// coherent across threadgroups, plain device accesses only within one unless the buffer is
// declared coherent(device), which a kernel body cannot do to MLX's parameters.
#pragma once

METAL_FUNC void ds4_grid_put(device atomic_uint* at, float v) {
  atomic_store_explicit(at, as_type<uint>(v), memory_order_relaxed);
}

METAL_FUNC float ds4_grid_get(device atomic_uint* at) {
  return as_type<float>(atomic_load_explicit(at, memory_order_relaxed));
}

// Call from every thread of the threadgroup once its partials are written (ds4_grid_put):
// true in every thread of the threadgroup that arrives last, which may then read all partials
// (ds4_grid_get) and must call ds4_grid_reset. `flag`: one threadgroup uint of the kernel.
METAL_FUNC bool ds4_grid_last(device atomic_uint* counter, uint groups, uint t,
                              threadgroup uint* flag) {
  atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
  threadgroup_barrier(mem_flags::mem_device);  // every thread's partials before the count
  if (t == 0)
    flag[0] = atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed) == groups - 1 ? 1u : 0u;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool last = flag[0] != 0;
  if (last) atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
  return last;
}

// The last threadgroup's thread 0 puts the counter back for the next launch (every other
// threadgroup has counted itself in already).
METAL_FUNC void ds4_grid_reset(device atomic_uint* counter, uint t) {
  if (t == 0) atomic_store_explicit(counter, 0u, memory_order_relaxed);
}
