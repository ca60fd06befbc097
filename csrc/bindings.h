// Argument checking shared by the CPU module (_C) and the CUDA module (_C_cuda): both
// accept the same arrays and refuse the same mistakes, with messages that name the
// argument.
#pragma once

#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "kernels.h"
#include "tensor_view.h"

namespace nic {

inline Element element_of(const TensorView& t) {
  switch (t.dtype()) {
    case Dtype::float16: return Element::float16;
    case Dtype::bfloat16: return Element::bfloat16;
    default: return Element::float32;  // callers admit only float dtypes
  }
}

inline void check_same_device(const TensorView& a, const TensorView& b, const char* what) {
  if (a.on_cuda() != b.on_cuda() || (a.on_cuda() && a.device_id() != b.device_id()))
    throw py::value_error(std::string(what) + ": all arrays must be on the same device");
}

// Host-side bounds check of patch or grid cells: a wrong cell must raise, not read or
// write out of bounds. (The CUDA module receives device cells: nic_fast.kernels checks
// them on the host before upload.)
inline void check_cells_in_bounds(const TensorView& cells, std::int64_t limit_y, std::int64_t limit_x,
                                  std::int64_t span, const char* what) {
  const std::int32_t* c = cells.data<std::int32_t>();
  for (std::int64_t n = 0; n < cells.size(0); ++n) {
    const std::int64_t y = c[2 * n], x = c[2 * n + 1];
    if (y < 0 || x < 0 || y + span > limit_y || x + span > limit_x)
      throw py::index_error(std::string(what) + ": cell " + std::to_string(n) + " at (" + std::to_string(y) + ", " +
                            std::to_string(x) + ") spans " + std::to_string(span) + " px, outside (" +
                            std::to_string(limit_y) + ", " + std::to_string(limit_x) + ")");
  }
}

inline void check_cells(TensorView& cells, bool cuda) {
  cells.expect_dtype({Dtype::int32}).expect_ndim(2).expect_size(1, 2, "(y, x)").expect_contiguous().expect_device(cuda);
}

inline PatchifyArgs patchify_args(TensorView& region, TensorView& cells, TensorView& out, int downsample, int dihedral,
                                  const std::vector<float>& scale, const std::vector<float>& offset, bool cuda) {
  region.expect_dtype({Dtype::uint8}).expect_ndim(3).expect_contiguous().expect_device(cuda);
  check_cells(cells, cuda);
  out.expect_dtype({Dtype::float32, Dtype::float16, Dtype::bfloat16});
  const Layout layout = out.expect_patch_layout();
  out.expect_device(cuda);
  check_same_device(region, out, "patchify");
  check_same_device(cells, out, "patchify");
  const int channels = static_cast<int>(region.size(2));
  if (channels < 1 || channels > kMaxChannels) region.fail("must have 1 to 4 channels");
  out.expect_size(0, cells.size(0), "number of cells").expect_size(1, channels, "channels of the region");
  if (out.size(2) != out.size(3)) out.fail("patches must be square");
  if (downsample < 1) throw py::value_error("patchify: downsample must be >= 1, got " + std::to_string(downsample));
  if (dihedral < 0 || dihedral > 7) throw py::value_error("patchify: dihedral must be in 0..7, got " + std::to_string(dihedral));
  if (static_cast<int>(scale.size()) != channels || static_cast<int>(offset.size()) != channels)
    throw py::value_error("patchify: scale and offset need one value per channel (" + std::to_string(channels) + ")");

  PatchifyArgs a{};
  a.region = region.data<std::uint8_t>();
  a.region_height = region.size(0);
  a.region_width = region.size(1);
  a.channels = channels;
  a.cells = cells.data<std::int32_t>();
  a.n_cells = cells.size(0);
  a.out = out.data<void>();
  a.out_type = element_of(out);
  a.out_channels_last = layout == Layout::channels_last;
  a.patch_px = static_cast<int>(out.size(2));
  a.downsample = downsample;
  a.dihedral = dihedral;
  for (int c = 0; c < channels; ++c) {
    a.scale[c] = scale[c];
    a.offset[c] = offset[c];
  }
  if (!cuda) check_cells_in_bounds(cells, a.region_height, a.region_width, std::int64_t(a.patch_px) * downsample, "patchify");
  return a;
}

inline ScatterArgs scatter_args(TensorView& embeddings, TensorView& cells, TensorView& grid, bool cuda) {
  embeddings.expect_dtype({Dtype::float32, Dtype::float16, Dtype::bfloat16}).expect_ndim(2).expect_contiguous().expect_device(cuda);
  check_cells(cells, cuda);
  grid.expect_dtype({Dtype::float32, Dtype::float16}).expect_ndim(3).expect_contiguous().expect_device(cuda);
  check_same_device(embeddings, grid, "scatter");
  check_same_device(cells, grid, "scatter");
  embeddings.expect_size(0, cells.size(0), "number of cells");
  grid.expect_size(2, embeddings.size(1), "code size of the embeddings");
  ScatterArgs a{};
  a.embeddings = embeddings.data<void>();
  a.embeddings_type = element_of(embeddings);
  a.cells = cells.data<std::int32_t>();
  a.n_cells = cells.size(0);
  a.code_size = embeddings.size(1);
  a.grid = grid.data<void>();
  a.grid_half = grid.dtype() == Dtype::float16;
  a.grid_height = grid.size(0);
  a.grid_width = grid.size(1);
  if (!cuda) check_cells_in_bounds(cells, a.grid_height, a.grid_width, 1, "scatter");
  return a;
}

}  // namespace nic
