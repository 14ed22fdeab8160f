// The probe of the GRID_SYNC variant (ds4mlx/kernels/grid.py): row sums over several
// threadgroups with the last-threadgroup pattern of grid.h, the smallest kernel that needs
// Metal 3.2's fence and the counter, so its first-use check decides for every kernel that has
// a grid-synchronised form.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).

#include "grid.h"

// @kernel grid_sum
// x [N, K] float32 -> out [N] (sum of the row), part [N, G] uint32 (the float bits of each
// chunk's sum); counter [>= N] uint32, zero before and after. Grid (G * 32, N), threadgroup
// (32, 1, 1): threadgroup g sums the chunk [g * CHUNK, (g + 1) * CHUNK) of its row.
threadgroup uint last_flag[1];
uint row = threadgroup_position_in_grid.y;
uint g = threadgroup_position_in_grid.x;
uint groups = threadgroups_per_grid.x;
uint t = thread_index_in_threadgroup;
device atomic_uint* cnt = (device atomic_uint*)counter + row;
device atomic_uint* parts = (device atomic_uint*)part + ulong(row) * groups;
float s = 0.0f;
for (uint k = g * CHUNK + t; k < min((g + 1) * uint(CHUNK), uint(K)); k += 32)
  s += x[ulong(row) * uint(K) + k];
s = simd_sum(s);
if (t == 0) ds4_grid_put(parts + g, s);
if (!ds4_grid_last(cnt, groups, t, last_flag)) return;
if (t == 0) {
  float total = 0.0f;
  for (uint c = 0; c < groups; ++c) total += ds4_grid_get(parts + c);  // chunk order
  out[row] = total;
}
ds4_grid_reset(cnt, t);
