// Kernel entry points. Arguments arrive already validated (bindings.h); these
// functions only compute. CPU versions in kernels_cpu.cpp, CUDA versions in
// kernels_cuda.cu, both built on the element functions of elements.h.
#pragma once

#include <cstdint>

#include "elements.h"

namespace nic {

constexpr int kMaxChannels = 4;

// Floating-point element types a kernel reads or writes.
enum class Element { float32, float16, bfloat16 };

struct PatchifyArgs {
  const std::uint8_t* region;  // (region_height, region_width, channels) uint8
  std::int64_t region_height, region_width;
  int channels;
  const std::int32_t* cells;  // (n_cells, 2): top-left (y, x) of each patch in the region
  std::int64_t n_cells;
  void* out;                  // (n_cells, channels, patch_px, patch_px) float32, float16 or bfloat16
  Element out_type;
  bool out_channels_last;
  int patch_px, downsample, dihedral;
  float scale[kMaxChannels], offset[kMaxChannels];
};

struct ScatterArgs {
  const void* embeddings;  // (n_cells, code_size) float32, float16 or bfloat16
  Element embeddings_type;
  const std::int32_t* cells;  // (n_cells, 2): grid (i, j)
  std::int64_t n_cells, code_size;
  void* grid;  // (grid_height, grid_width, code_size) float32 or float16
  bool grid_half;  // float16, else float32
  std::int64_t grid_height, grid_width;
};

void patchify_cpu(const PatchifyArgs& args);
void scatter_cpu(const ScatterArgs& args);

// Tissue detection on a thumbnail (CPU only: a thumbnail is small).
struct TissueMaskArgs {
  const std::uint8_t* rgb;  // (height, width, 3)
  std::uint8_t* mask;       // (height, width), 0/1
  std::int64_t height, width;
  int black_level;          // pixels with max(R,G,B) <= this are not tissue
  int min_threshold;        // floor on the Otsu saturation threshold (blank slides)
  int max_threshold;        // ceiling on it (slides that are all tissue)
  std::int64_t min_object_px, max_hole_px;
  const std::uint8_t* exclude = nullptr;  // (height, width) or null: never tissue, left out of Otsu (ink)
};
int tissue_mask_cpu(const TissueMaskArgs& args);  // returns the saturation threshold used

// Marker ink on a thumbnail: pixels of certain or possible ink (ink_evidence) that are
// 8-connected to at least min_strong_px certain ones, grown by dilate_px (a square),
// because a stroke's soft edge over tissue looks like tissue.
struct InkMaskArgs {
  const std::uint8_t* rgb;  // (height, width, 3)
  std::uint8_t* ink;        // (height, width), 0/1
  std::int64_t height, width;
  InkRule rule;
  std::int64_t min_strong_px;
  int dilate_px;
};
void ink_evidence_cpu(const std::uint8_t* rgb, std::uint8_t* out, std::int64_t n_px, const InkRule& rule);
void ink_mask_cpu(const InkMaskArgs& args);
void cell_fraction_cpu(const std::uint8_t* mask, std::int64_t height, std::int64_t width, float* out,
                       std::int64_t grid_height, std::int64_t grid_width, float stride_px, float size_px);

}  // namespace nic
