// GGUF IQ2_XXS: 256 weights in 66 bytes: fp16 d, then 8 groups of 32 as two little-endian
// uint32 (a, b). Byte k of a picks a codebook entry (8 levels of {8, 25, 43}) for run k of 8;
// bits 7k..7k+6 of b pick its sign mask (8th bit = parity); ls = b >> 28.
// x = d * (0.5 + ls) * 0.25 * level * sign.
// DS4_IQ2XXS_GRID (the 256 codebook entries, 2 bits per level) is defined by ds4mlx/kernels/__init__.py
// from ds4mlx.quant.gguf.iq2_xxs.GRID_CODES, the one home of the table.
// Decode dot (instructions per weight, counted from the code): before, per weight a 2-bit
// level extract, two compares and selects to the level, a multiply by the group scale, the
// sign test and negate, an FMA (~11), plus ~30 per 8 (byte-wise loads of the words and d, a
// divergent `constant` grid read, the parity): ~14.8. Now the grid is expanded once per
// threadgroup into threadgroup memory as 8 level bytes per entry (2 KB, a barrier), the group
// read with 16-bit loads once per 32 and its scale applied once: per weight a byte extract, a
// convert, a sign select, an FMA (~5.8), plus ~58 per 32 (words, d, scale, four grid reads
// and sign parities): ~7.6. The signs keep the popcount parity (3 instructions per 8): cheaper
// than a 128-entry sign table.
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
  // tab[2c], tab[2c + 1]: entry c's 8 levels as bytes (levels 0-3, 4-7)
  enum { TAB = 512 };
  static void fill_tab(threadgroup uint* tab, uint t, uint n) {
    for (uint c = t; c < 256; c += n) {
      uint code = ds4_iq2xxs_grid[c];
      uint words[2] = {0u, 0u};
      for (uint i = 0; i < 8; ++i) {
        uint level = (code >> (2 * i)) & 3;
        uint lv = level == 0 ? 8u : (level == 1 ? 25u : 43u);
        words[i / 4] |= lv << (8 * (i % 4));
      }
      tab[2 * c] = words[0];
      tab[2 * c + 1] = words[1];
    }
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint* tab) {
    const device uint8_t* b = w + (e / DS4_IQ2_XXS_BLOCK) * DS4_IQ2_XXS_BYTES;
    // one group; 66-byte blocks are 2-byte aligned
    const device ushort* g = (const device ushort*)(b + 2 + 8 * ((e % DS4_IQ2_XXS_BLOCK) / 32));
    uint a = uint(g[0]) | (uint(g[1]) << 16);
    uint bw = uint(g[2]) | (uint(g[3]) << 16);
    float db = float(as_type<half>(ushort(*(const device ushort*)b))) * (0.5f + float(bw >> 28)) * 0.25f;
    float acc = 0.0f;
    for (uint run = 0; run < 4; ++run) {
      uint c = (a >> (8 * run)) & 255;
      uint sidx = (bw >> (7 * run)) & 127;
      uint signs = sidx | ((popcount(sidx) & 1) << 7);
      for (uint h = 0; h < 2; ++h) {
        uint lv = tab[2 * c + h];
        for (uint i = 0; i < 4; ++i) {
          float x = xs[8 * run + 4 * h + i];
          acc += float((lv >> (8 * i)) & 255) * ((signs >> (4 * h + i)) & 1 ? -x : x);
        }
      }
    }
    return db * acc;
  }
};
