// OpenMP loops over the element functions of elements.h.
#include <algorithm>
#include <array>
#include <vector>

#include "elements.h"
#include "kernels.h"

namespace nic {

namespace {

// kChannels, kDownsample and kDihedral are compile-time copies of the arguments for
// the common cases (RGB, downsample 1 or 2, every transform), so that after inlining
// the element function's box loop, transform switch and channel loop fold away;
// 0 / -1 mean "read it from args".
template <typename Out, int kChannels, int kDownsample, int kDihedral>
void patchify_loop(const PatchifyArgs& a) {
  Out* out = static_cast<Out*>(a.out);
  const std::int64_t P = a.patch_px, C = kChannels > 0 ? kChannels : a.channels;
  const int downsample = kDownsample > 0 ? kDownsample : a.downsample;
  const int dihedral = kDihedral >= 0 ? kDihedral : a.dihedral;
#pragma omp parallel for schedule(static) collapse(2)
  for (std::int64_t n = 0; n < a.n_cells; ++n) {
    for (std::int64_t y = 0; y < P; ++y) {
      const std::int64_t y0 = a.cells[2 * n], x0 = a.cells[2 * n + 1];
      for (std::int64_t x = 0; x < P; ++x) {
        for (std::int64_t c = 0; c < C; ++c) {
          const float v = patchify_value(a.region, a.region_width, a.channels, y0, x0, a.patch_px, downsample,
                                         dihedral, static_cast<int>(y), static_cast<int>(x), static_cast<int>(c),
                                         a.scale[c], a.offset[c]);
          const std::int64_t index = a.out_channels_last ? ((n * P + y) * P + x) * C + c : ((n * C + c) * P + y) * P + x;
          Store<Out>::put(out + index, v);
        }
      }
    }
  }
}

template <typename Out, int kChannels, int kDownsample>
void patchify_dispatch_dihedral(const PatchifyArgs& a) {
  switch (a.dihedral) {
    case 0: return patchify_loop<Out, kChannels, kDownsample, 0>(a);
    case 1: return patchify_loop<Out, kChannels, kDownsample, 1>(a);
    case 2: return patchify_loop<Out, kChannels, kDownsample, 2>(a);
    case 3: return patchify_loop<Out, kChannels, kDownsample, 3>(a);
    case 4: return patchify_loop<Out, kChannels, kDownsample, 4>(a);
    case 5: return patchify_loop<Out, kChannels, kDownsample, 5>(a);
    case 6: return patchify_loop<Out, kChannels, kDownsample, 6>(a);
    default: return patchify_loop<Out, kChannels, kDownsample, 7>(a);
  }
}

template <typename Out>
void patchify_dispatch(const PatchifyArgs& a) {
  if (a.channels == 3 && a.downsample == 1) patchify_dispatch_dihedral<Out, 3, 1>(a);
  else if (a.channels == 3 && a.downsample == 2) patchify_dispatch_dihedral<Out, 3, 2>(a);
  else if (a.downsample == 1) patchify_dispatch_dihedral<Out, 0, 1>(a);
  else patchify_loop<Out, 0, 0, -1>(a);
}

template <typename In, typename Out>
void scatter_loop(const ScatterArgs& a) {
  const In* emb = static_cast<const In*>(a.embeddings);
  Out* grid = static_cast<Out*>(a.grid);
#pragma omp parallel for schedule(static)
  for (std::int64_t n = 0; n < a.n_cells; ++n) {
    const std::int64_t base = (static_cast<std::int64_t>(a.cells[2 * n]) * a.grid_width + a.cells[2 * n + 1]) * a.code_size;
    for (std::int64_t c = 0; c < a.code_size; ++c) Store<Out>::put(grid + base + c, Store<In>::get(emb + n * a.code_size + c));
  }
}

int otsu_threshold(const std::array<std::int64_t, 256>& hist) {
  std::int64_t total = 0;
  double sum_all = 0.0;
  for (int t = 0; t < 256; ++t) {
    total += hist[t];
    sum_all += static_cast<double>(t) * hist[t];
  }
  double best_var = -1.0, sum_low = 0.0;
  std::int64_t count_low = 0;
  int best = 0;
  for (int t = 0; t < 256; ++t) {  // class "low" = values <= t
    count_low += hist[t];
    sum_low += static_cast<double>(t) * hist[t];
    const std::int64_t count_high = total - count_low;
    if (count_low == 0 || count_high == 0) continue;
    const double mean_low = sum_low / count_low, mean_high = (sum_all - sum_low) / count_high;
    const double var = static_cast<double>(count_low) * count_high * (mean_low - mean_high) * (mean_low - mean_high);
    if (var > best_var) {
      best_var = var;
      best = t;
    }
  }
  return best;
}

// Sets to `fill` every 8-connected component of pixels equal to `value` that has fewer
// than `max_px` pixels; with `keep_border`, components touching the image border stay
// (background around the tissue is not a hole).
void clear_small_components(std::uint8_t* mask, std::int64_t h, std::int64_t w, std::uint8_t value, std::uint8_t fill,
                            std::int64_t max_px, bool keep_border) {
  if (max_px <= 0) return;
  std::vector<std::uint8_t> seen(static_cast<size_t>(h * w), 0);
  std::vector<std::int64_t> component, stack;
  for (std::int64_t start = 0; start < h * w; ++start) {
    if (seen[start] || mask[start] != value) continue;
    component.clear();
    stack.assign(1, start);
    seen[start] = 1;
    bool touches_border = false;
    while (!stack.empty()) {
      const std::int64_t p = stack.back();
      stack.pop_back();
      component.push_back(p);
      const std::int64_t y = p / w, x = p % w;
      touches_border |= (y == 0 || x == 0 || y == h - 1 || x == w - 1);
      for (std::int64_t dy = -1; dy <= 1; ++dy) {
        for (std::int64_t dx = -1; dx <= 1; ++dx) {
          const std::int64_t ny = y + dy, nx = x + dx;
          if (ny < 0 || nx < 0 || ny >= h || nx >= w) continue;
          const std::int64_t q = ny * w + nx;
          if (!seen[q] && mask[q] == value) {
            seen[q] = 1;
            stack.push_back(q);
          }
        }
      }
    }
    if (static_cast<std::int64_t>(component.size()) < max_px && !(keep_border && touches_border))
      for (std::int64_t p : component) mask[p] = fill;
  }
}

// Keeps only the 8-connected components of nonzero `evidence` with at least `min_strong`
// pixels equal to 2: out = 1 there, 0 elsewhere.
void components_with_strong(const std::uint8_t* evidence, std::uint8_t* out, std::int64_t h, std::int64_t w,
                            std::int64_t min_strong) {
  std::fill(out, out + h * w, std::uint8_t{0});
  std::vector<std::uint8_t> seen(static_cast<size_t>(h * w), 0);
  std::vector<std::int64_t> component, stack;
  for (std::int64_t start = 0; start < h * w; ++start) {
    if (seen[start] || evidence[start] == 0) continue;
    component.clear();
    stack.assign(1, start);
    seen[start] = 1;
    std::int64_t strong = 0;
    while (!stack.empty()) {
      const std::int64_t p = stack.back();
      stack.pop_back();
      component.push_back(p);
      strong += evidence[p] == 2;
      const std::int64_t y = p / w, x = p % w;
      for (std::int64_t dy = -1; dy <= 1; ++dy) {
        for (std::int64_t dx = -1; dx <= 1; ++dx) {
          const std::int64_t ny = y + dy, nx = x + dx;
          if (ny < 0 || nx < 0 || ny >= h || nx >= w) continue;
          const std::int64_t q = ny * w + nx;
          if (!seen[q] && evidence[q] != 0) {
            seen[q] = 1;
            stack.push_back(q);
          }
        }
      }
    }
    if (strong >= min_strong && strong > 0)
      for (std::int64_t p : component) out[p] = 1;
  }
}

// Binary dilation by a (2r+1) x (2r+1) square, as a row pass then a column pass.
void dilate_square(std::uint8_t* mask, std::int64_t h, std::int64_t w, int r) {
  if (r <= 0) return;
  std::vector<std::uint8_t> rows(static_cast<size_t>(h * w));
#pragma omp parallel for schedule(static)
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) {
      std::uint8_t v = 0;
      for (std::int64_t k = std::max<std::int64_t>(0, x - r); k <= std::min<std::int64_t>(w - 1, x + r) && !v; ++k)
        v = mask[y * w + k];
      rows[y * w + x] = v;
    }
#pragma omp parallel for schedule(static)
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) {
      std::uint8_t v = 0;
      for (std::int64_t k = std::max<std::int64_t>(0, y - r); k <= std::min<std::int64_t>(h - 1, y + r) && !v; ++k)
        v = rows[k * w + x];
      mask[y * w + x] = v;
    }
}

}  // namespace

void patchify_cpu(const PatchifyArgs& args) {
  switch (args.out_type) {
    case Element::float16: return patchify_dispatch<std::uint16_t>(args);
    case Element::bfloat16: return patchify_dispatch<Bf16Bits>(args);
    case Element::float32: return patchify_dispatch<float>(args);
  }
}

template <typename In>
void scatter_to_grid(const ScatterArgs& args) {
  if (args.grid_half) scatter_loop<In, std::uint16_t>(args);
  else scatter_loop<In, float>(args);
}

void scatter_cpu(const ScatterArgs& args) {
  switch (args.embeddings_type) {
    case Element::float16: return scatter_to_grid<std::uint16_t>(args);
    case Element::bfloat16: return scatter_to_grid<Bf16Bits>(args);
    case Element::float32: return scatter_to_grid<float>(args);
  }
}

int tissue_mask_cpu(const TissueMaskArgs& a) {
  const std::int64_t n = a.height * a.width;
#pragma omp parallel for schedule(static)
  for (std::int64_t p = 0; p < n; ++p)
    a.mask[p] = tissue_saturation(a.rgb[3 * p], a.rgb[3 * p + 1], a.rgb[3 * p + 2], static_cast<std::uint8_t>(a.black_level));
  std::array<std::int64_t, 256> hist{};
  for (std::int64_t p = 0; p < n; ++p)
    if (!a.exclude || !a.exclude[p]) ++hist[a.mask[p]];
  const int threshold = std::min(std::max(otsu_threshold(hist), a.min_threshold), a.max_threshold);
  for (std::int64_t p = 0; p < n; ++p) a.mask[p] = a.mask[p] > threshold && !(a.exclude && a.exclude[p]) ? 1 : 0;
  clear_small_components(a.mask, a.height, a.width, 1, 0, a.min_object_px, false);
  clear_small_components(a.mask, a.height, a.width, 0, 1, a.max_hole_px, true);
  if (a.exclude)  // a filled hole must not bring excluded pixels back
    for (std::int64_t p = 0; p < n; ++p) a.mask[p] = a.mask[p] && !a.exclude[p];
  return threshold;
}

void ink_evidence_cpu(const std::uint8_t* rgb, std::uint8_t* out, std::int64_t n_px, const InkRule& rule) {
#pragma omp parallel for schedule(static)
  for (std::int64_t p = 0; p < n_px; ++p) out[p] = ink_evidence(rgb[3 * p], rgb[3 * p + 1], rgb[3 * p + 2], rule);
}

void ink_mask_cpu(const InkMaskArgs& a) {
  const std::int64_t n = a.height * a.width;
  std::vector<std::uint8_t> evidence(static_cast<size_t>(n));
  ink_evidence_cpu(a.rgb, evidence.data(), n, a.rule);
  components_with_strong(evidence.data(), a.ink, a.height, a.width, a.min_strong_px);
  dilate_square(a.ink, a.height, a.width, a.dilate_px);
}

void cell_fraction_cpu(const std::uint8_t* mask, std::int64_t height, std::int64_t width, float* out,
                       std::int64_t grid_height, std::int64_t grid_width, float stride_px, float size_px) {
#pragma omp parallel for schedule(static) collapse(2)
  for (std::int64_t i = 0; i < grid_height; ++i)
    for (std::int64_t j = 0; j < grid_width; ++j)
      out[i * grid_width + j] = cell_fraction_value(mask, height, width, i, j, stride_px, size_px);
}

}  // namespace nic
