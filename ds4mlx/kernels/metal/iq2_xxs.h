// GGUF IQ2_XXS: 256 weights in 66 bytes: fp16 d, then 8 groups of 32 as two little-endian
// uint32 (a, b). Byte k of a picks a codebook entry (8 levels of {8, 25, 43}) for run k of 8;
// bits 7k..7k+6 of b pick its sign mask (8th bit = parity); ls = b >> 28.
// x = d * (0.5 + ls) * 0.25 * level * sign.
// DS4_IQ2XXS_GRID (the 256 codebook entries, 2 bits per level) is defined by ds4mlx/kernels/__init__.py
// from ds4mlx.quant.gguf.iq2_xxs.GRID_CODES, the one home of the table.
#pragma once

constant ushort ds4_iq2xxs_grid[256] = {DS4_IQ2XXS_GRID};

template <> struct QFmt<DS4_IQ2_XXS> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_IQ2_XXS_BLOCK) * DS4_IQ2_XXS_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_IQ2_XXS_BLOCK) * DS4_IQ2_XXS_BYTES;
    uint r = e % DS4_IQ2_XXS_BLOCK;
    const device uint8_t* g = b + 2 + 8 * (r / 32);  // the group's (a, b) words
    uint run = (r % 32) / 8;
    uint bw = uint(g[4]) | (uint(g[5]) << 8) | (uint(g[6]) << 16) | (uint(g[7]) << 24);
    float db = ds4_half_at(b) * (0.5f + float(bw >> 28)) * 0.25f;
    uint code = ds4_iq2xxs_grid[g[run]];
    uint sidx = (bw >> (7 * run)) & 127;
    uint signs = sidx | ((popcount(sidx) & 1) << 7);
    for (int i = 0; i < 8; ++i) {
      uint level = (code >> (2 * i)) & 3;
      float lv = level == 0 ? 8.0f : (level == 1 ? 25.0f : 43.0f);
      float x = db * lv;
      v[i] = ((signs >> i) & 1) ? -x : x;
    }
  }
};
