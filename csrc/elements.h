// Per-element arithmetic of every nic-fast kernel.
//
// Each function here is the single definition of what one output element is; the
// OpenMP loops (kernels_cpu.cpp) and the CUDA kernels (kernels_cuda.cu) only decide
// which elements a thread computes. CPU tests therefore cover what the GPU computes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define NIC_HD __host__ __device__ __forceinline__
#else
#define NIC_HD inline
#endif

namespace nic {

// ---------------------------------------------------------------------------------
// float16 storage. One rounding routine (round to nearest even) on both sides, so a
// CPU and a GPU run produce the same bits.
NIC_HD uint16_t float_to_half_bits(float value) {
  union { float f; uint32_t u; } pun;
  pun.f = value;
  const uint32_t bits = pun.u;
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x0200u : 0u));
  }
  if (abs_bits >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (abs_bits < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs_bits < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to 0
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 .. 24
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = ((abs_bits - 0x38000000u) >> 13);
  const uint32_t rest = abs_bits & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(sign | half);
}

NIC_HD float half_bits_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  union { uint32_t u; float f; } pun;
  pun.u = bits;
  return pun.f;
}

// bfloat16 storage: the top 16 bits of a float32, rounded to nearest even (NaN stays
// a quiet NaN). Used for the encoder's input and output when it runs in bfloat16.
NIC_HD uint16_t float_to_bf16_bits(float value) {
  union { float f; uint32_t u; } pun;
  pun.f = value;
  const uint32_t bits = pun.u;
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

NIC_HD float bf16_bits_to_float(uint16_t bf16) {
  union { uint32_t u; float f; } pun;
  pun.u = static_cast<uint32_t>(bf16) << 16;
  return pun.f;
}

// A bfloat16 element: a distinct type so that Store<> can tell it from float16 bits.
struct Bf16Bits {
  uint16_t bits;
};

template <typename T> struct Store;
template <> struct Store<float> {
  NIC_HD static void put(float* dst, float v) { *dst = v; }
  NIC_HD static float get(const float* src) { return *src; }
};
template <> struct Store<uint16_t> {  // float16 bits
  NIC_HD static uint16_t bits(float v) { return float_to_half_bits(v); }
  NIC_HD static float value(uint16_t bits) { return half_bits_to_float(bits); }
  NIC_HD static void put(uint16_t* dst, float v) { *dst = bits(v); }
  NIC_HD static float get(const uint16_t* src) { return value(*src); }
};
template <> struct Store<Bf16Bits> {
  NIC_HD static uint16_t bits(float v) { return float_to_bf16_bits(v); }
  NIC_HD static float value(uint16_t bits) { return bf16_bits_to_float(bits); }
  NIC_HD static void put(Bf16Bits* dst, float v) { dst->bits = bits(v); }
  NIC_HD static float get(const Bf16Bits* src) { return value(src->bits); }
};

// ---------------------------------------------------------------------------------
// Dihedral transforms. k = rotations + 4 * mirror, 0 <= k < 8:
//   T_k(a) = rot90(fliplr(a) if k >= 4 else a, k % 4)       (numpy's rot90: counter-clockwise)
// Given an output pixel (y, x) of T_k(a) for a side x side patch, return the pixel of a
// it comes from.
NIC_HD void dihedral_source(int k, int side, int y, int x, int* src_y, int* src_x) {
  const int last = side - 1;
  int u, v;  // pixel of fliplr(a) (or a itself) that rot90^r puts at (y, x)
  switch (k & 3) {
    case 0: u = y; v = x; break;
    case 1: u = x; v = last - y; break;
    case 2: u = last - y; v = last - x; break;
    default: u = last - x; v = y; break;
  }
  *src_y = u;
  *src_x = (k >= 4) ? last - v : v;
}

// One channel of one output pixel of a patch: the box mean of a downsample x downsample
// block of the uint8 HWC region, normalised as value * scale + offset.
// (patch_y0, patch_x0) is the patch's top-left pixel in the region; (y, x) the output
// pixel in the transformed patch of side patch_px.
NIC_HD float patchify_value(const uint8_t* region, int64_t region_width, int channels,
                            int64_t patch_y0, int64_t patch_x0, int patch_px, int downsample,
                            int dihedral, int y, int x, int channel, float scale, float offset) {
  int src_y, src_x;
  dihedral_source(dihedral, patch_px, y, x, &src_y, &src_x);
  const int64_t row0 = patch_y0 + static_cast<int64_t>(src_y) * downsample;
  const int64_t col0 = patch_x0 + static_cast<int64_t>(src_x) * downsample;
  uint32_t sum = 0;
  for (int dy = 0; dy < downsample; ++dy) {
    const uint8_t* row = region + ((row0 + dy) * region_width + col0) * channels + channel;
    for (int dx = 0; dx < downsample; ++dx) sum += row[dx * channels];
  }
  const float mean = static_cast<float>(sum) / static_cast<float>(downsample * downsample);
  return mean * scale + offset;  // compiled without FMA contraction on both sides
}

// ---------------------------------------------------------------------------------
// Tissue: HSV saturation of an RGB pixel, 0 for pixels darker than black_level (pen,
// slide edges, scanner artefacts), scaled to 0..255.
NIC_HD uint8_t tissue_saturation(uint8_t r, uint8_t g, uint8_t b, uint8_t black_level) {
  const uint8_t hi = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const uint8_t lo = r < g ? (r < b ? r : b) : (g < b ? g : b);
  if (hi <= black_level || hi == 0) return 0;
  return static_cast<uint8_t>((static_cast<uint32_t>(hi - lo) * 255u + hi / 2u) / hi);
}

// Marker ink (blue, green, black pen on the glass or over tissue). H&E stains pink to
// purple: red light passes at least as well as green (hue 255..360 and 0..60 degrees)
// and dark tissue stays coloured. Blue and green ink absorb red (hue 60..255, or green
// brighter than red); black ink is dark and grey on glass, darker than stained tissue
// over it. Thresholds live in InkRule (kernels.h documents each); all arithmetic is
// integer so that CPU, GPU and the NumPy reference agree exactly.
struct InkRule {
  int strong_chroma, strong_hue_lo, strong_hue_hi;  // certain colour ink: chroma and hue window
  int weak_chroma, weak_hue_lo, weak_hue_hi;        // possible colour ink
  int green_chroma, strong_green_excess, weak_green_excess;  // G - R of green ink (with that chroma)
  int strong_dark, weak_dark;                        // max(R,G,B) at or below: certain / possible black ink
  int neutral_max, neutral_ratio;                    // grey: max <= neutral_max and ratio * chroma <= max
};

NIC_HD int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0

// HSV hue in whole degrees 0..359, rounded down; 0 for greys.
NIC_HD int hue_degrees(int r, int g, int b) {
  const int hi = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const int lo = r < g ? (r < b ? r : b) : (g < b ? g : b);
  const int chroma = hi - lo;
  if (chroma == 0) return 0;
  int hue;
  if (hi == r) hue = floor_div(60 * (g - b), chroma);
  else if (hi == g) hue = 120 + floor_div(60 * (b - r), chroma);
  else hue = 240 + floor_div(60 * (r - g), chroma);
  return hue < 0 ? hue + 360 : hue;
}

// Ink evidence of one pixel: 2 certain, 1 possible (only counts when connected to
// certain ink), 0 none.
NIC_HD uint8_t ink_evidence(uint8_t r, uint8_t g, uint8_t b, const InkRule& k) {
  const int hi = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const int lo = r < g ? (r < b ? r : b) : (g < b ? g : b);
  const int chroma = hi - lo, hue = hue_degrees(r, g, b), green_excess = int(g) - int(r);
  const bool strong = (chroma >= k.strong_chroma && hue >= k.strong_hue_lo && hue <= k.strong_hue_hi) ||
                      (chroma >= k.green_chroma && green_excess >= k.strong_green_excess) || hi <= k.strong_dark ||
                      (hi <= k.neutral_max && k.neutral_ratio * chroma <= hi);
  if (strong) return 2;
  const bool weak = (chroma >= k.weak_chroma && hue >= k.weak_hue_lo && hue <= k.weak_hue_hi) ||
                    (chroma >= k.green_chroma && green_excess >= k.weak_green_excess) || hi <= k.weak_dark;
  return weak ? 1 : 0;
}

// Fraction of mask pixels whose centre lies in the footprint of grid cell (i, j): the
// square [i*stride, i*stride + size) x [j*stride, j*stride + size), in mask pixels.
NIC_HD float cell_fraction_value(const uint8_t* mask, int64_t height, int64_t width, int64_t i,
                                 int64_t j, float stride, float size) {
  // pixel p is inside [a, b) when a <= p + 0.5 < b  <=>  ceil(a - 0.5) <= p < ceil(b - 0.5)
  const float y_lo = i * stride, x_lo = j * stride;
  int64_t y0 = static_cast<int64_t>(ceilf(y_lo - 0.5f)), y1 = static_cast<int64_t>(ceilf(y_lo + size - 0.5f));
  int64_t x0 = static_cast<int64_t>(ceilf(x_lo - 0.5f)), x1 = static_cast<int64_t>(ceilf(x_lo + size - 0.5f));
  const int64_t area = (y1 - y0) * (x1 - x0);
  if (area <= 0) return 0.0f;
  y0 = y0 < 0 ? 0 : y0; x0 = x0 < 0 ? 0 : x0;
  y1 = y1 > height ? height : y1; x1 = x1 > width ? width : x1;
  int64_t count = 0;
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t x = x0; x < x1; ++x) count += mask[y * width + x] != 0;
  return static_cast<float>(count) / static_cast<float>(area);
}

}  // namespace nic
