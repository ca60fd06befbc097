// nic_fast._C: the CPU kernels. Always built; needs no CUDA at run time.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bindings.h"
#include "jpeg_check.h"
#include "kernels.h"

namespace py = pybind11;
using nic::TensorView;

namespace {

void patchify(py::object region, py::object cells, py::object out, int downsample, int dihedral,
              const std::vector<float>& scale, const std::vector<float>& offset) {
  TensorView r(std::move(region), "region"), c(std::move(cells), "cells"), o(std::move(out), "out");
  const nic::PatchifyArgs args = nic::patchify_args(r, c, o, downsample, dihedral, scale, offset, false);
  py::gil_scoped_release release;
  nic::patchify_cpu(args);
}

void scatter(py::object embeddings, py::object cells, py::object grid) {
  TensorView e(std::move(embeddings), "embeddings"), c(std::move(cells), "cells"), g(std::move(grid), "grid");
  const nic::ScatterArgs args = nic::scatter_args(e, c, g, false);
  py::gil_scoped_release release;
  nic::scatter_cpu(args);
}

void expect_thumbnail(TensorView& t) {
  t.expect_dtype({nic::Dtype::uint8}).expect_ndim(3).expect_size(2, 3, "RGB").expect_contiguous().expect_device(false);
}

// A (height, width) uint8/bool array on the host, the size of the thumbnail.
void expect_thumbnail_plane(TensorView& plane, const TensorView& thumbnail) {
  plane.expect_dtype({nic::Dtype::uint8, nic::Dtype::boolean}).expect_ndim(2).expect_contiguous().expect_device(false);
  plane.expect_size(0, thumbnail.size(0), "height of the thumbnail").expect_size(1, thumbnail.size(1), "width of the thumbnail");
}

int tissue_mask(py::object rgb, py::object mask, int black_level, int min_threshold, int max_threshold,
                std::int64_t min_object_px, std::int64_t max_hole_px, py::object exclude) {
  TensorView t(std::move(rgb), "thumbnail"), m(std::move(mask), "mask");
  expect_thumbnail(t);
  expect_thumbnail_plane(m, t);
  if (black_level < 0 || black_level > 255 || min_threshold < 0 || max_threshold > 255 || min_threshold > max_threshold)
    throw py::value_error("tissue_mask: need 0 <= black_level <= 255 and 0 <= min_threshold <= max_threshold <= 255");
  std::unique_ptr<TensorView> e;
  if (!exclude.is_none()) {
    e = std::make_unique<TensorView>(std::move(exclude), "exclude");
    expect_thumbnail_plane(*e, t);
  }
  const std::uint8_t* exclude_data = e ? e->data<std::uint8_t>() : nullptr;
  const nic::TissueMaskArgs args{t.data<std::uint8_t>(), m.data<std::uint8_t>(), t.size(0), t.size(1), black_level,
                                 min_threshold, max_threshold, min_object_px, max_hole_px, exclude_data};
  py::gil_scoped_release release;
  return nic::tissue_mask_cpu(args);
}

nic::InkRule ink_rule(const std::vector<int>& values) {
  constexpr size_t kFields = sizeof(nic::InkRule) / sizeof(int);
  if (values.size() != kFields)
    throw py::value_error("ink rule: expected " + std::to_string(kFields) + " integers, got " + std::to_string(values.size()));
  nic::InkRule rule{};
  std::copy(values.begin(), values.end(), reinterpret_cast<int*>(&rule));
  return rule;
}

void ink_evidence(py::object rgb, py::object out, const std::vector<int>& rule) {
  TensorView t(std::move(rgb), "thumbnail"), o(std::move(out), "out");
  expect_thumbnail(t);
  expect_thumbnail_plane(o, t);
  const nic::InkRule k = ink_rule(rule);
  const std::uint8_t* rgb_data = t.data<std::uint8_t>();
  std::uint8_t* out_data = o.data<std::uint8_t>();
  const std::int64_t n = t.size(0) * t.size(1);
  py::gil_scoped_release release;
  nic::ink_evidence_cpu(rgb_data, out_data, n, k);
}

void ink_mask(py::object rgb, py::object out, const std::vector<int>& rule, std::int64_t min_strong_px, int dilate_px) {
  TensorView t(std::move(rgb), "thumbnail"), o(std::move(out), "ink");
  expect_thumbnail(t);
  expect_thumbnail_plane(o, t);
  if (min_strong_px < 1 || dilate_px < 0)
    throw py::value_error("ink_mask: need min_strong_px >= 1 and dilate_px >= 0");
  const nic::InkMaskArgs args{t.data<std::uint8_t>(), o.data<std::uint8_t>(), t.size(0), t.size(1), ink_rule(rule),
                              min_strong_px, dilate_px};
  py::gil_scoped_release release;
  nic::ink_mask_cpu(args);
}

void cell_fraction(py::object mask, py::object out, float stride_px, float size_px) {
  TensorView m(std::move(mask), "mask"), o(std::move(out), "out");
  m.expect_dtype({nic::Dtype::uint8, nic::Dtype::boolean}).expect_ndim(2).expect_contiguous().expect_device(false);
  o.expect_dtype({nic::Dtype::float32}).expect_ndim(2).expect_contiguous().expect_device(false);
  if (!(stride_px > 0.0f) || !(size_px > 0.0f)) throw py::value_error("cell_fraction: stride_px and size_px must be > 0");
  const std::uint8_t* mask_data = m.data<std::uint8_t>();
  const std::int64_t h = m.size(0), w = m.size(1), gh = o.size(0), gw = o.size(1);
  float* out_data = o.data<float>();
  py::gil_scoped_release release;
  nic::cell_fraction_cpu(mask_data, h, w, out_data, gh, gw, stride_px, size_px);
}

nic::JpegExpect jpeg_expect(std::pair<int, int> full_hw, std::pair<int, int> clip_hw, int components) {
  return nic::JpegExpect{full_hw.first, full_hw.second, clip_hw.first, clip_hw.second, components};
}

std::string check_jpeg(py::buffer data, py::buffer tables, std::pair<int, int> full_hw, std::pair<int, int> clip_hw,
                       int components) {
  const py::buffer_info d = data.request(), t = tables.request();
  if (d.itemsize != 1 || t.itemsize != 1 || d.ndim != 1 || t.ndim != 1)
    throw py::value_error("check_jpeg: data and tables must be 1-d byte buffers");
  const nic::JpegExpect expect = jpeg_expect(full_hw, clip_hw, components);
  py::gil_scoped_release release;
  return nic::check_jpeg(static_cast<const std::uint8_t*>(d.ptr), d.size, static_cast<const std::uint8_t*>(t.ptr), t.size,
                         expect);
}

using Int64s = py::array_t<std::int64_t, py::array::c_style>;
using Int32s = py::array_t<std::int32_t, py::array::c_style>;

std::vector<std::string> check_jpeg_tiles(int fd, const Int64s& offsets, const Int64s& sizes, const Int32s& clip_hw,
                                          std::pair<int, int> full_hw, int components, py::buffer tables, int threads) {
  const std::int64_t n = offsets.size();
  if (offsets.ndim() != 1 || sizes.ndim() != 1 || sizes.size() != n || clip_hw.ndim() != 2 || clip_hw.shape(0) != n ||
      clip_hw.shape(1) != 2)
    throw py::value_error("check_jpeg_tiles: need offsets (n,), sizes (n,) and clip_hw (n, 2) for the same n tiles");
  const py::buffer_info t = tables.request();
  if (t.itemsize != 1 || t.ndim != 1) throw py::value_error("check_jpeg_tiles: tables must be a 1-d byte buffer");
  std::vector<nic::JpegTile> tiles(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t offset = offsets.at(i), size = sizes.at(i);
    if (offset < 0 || size < 0) throw py::value_error("check_jpeg_tiles: negative offset or size");
    tiles[i] = nic::JpegTile{offset, size, jpeg_expect(full_hw, {clip_hw.at(i, 0), clip_hw.at(i, 1)}, components)};
  }
  py::gil_scoped_release release;
  return nic::check_jpeg_tiles(fd, tiles, static_cast<const std::uint8_t*>(t.ptr), t.size, threads);
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nic-fast CPU kernels (OpenMP). Arrays cross by DLPack, without copies.";
  m.def("patchify", &patchify, py::arg("region"), py::arg("cells"), py::arg("out"), py::arg("downsample"),
        py::arg("dihedral"), py::arg("scale"), py::arg("offset"),
        "uint8 HWC region + (N, 2) int32 top-left pixels -> out (N, C, P, P) float32/float16, NCHW or channels-last.");
  m.def("scatter", &scatter, py::arg("embeddings"), py::arg("cells"), py::arg("grid"),
        "(N, C) embeddings + (N, 2) int32 grid cells -> their places in an (H, W, C) grid.");
  m.def("tissue_mask", &tissue_mask, py::arg("rgb"), py::arg("mask"), py::arg("black_level"),
        py::arg("min_threshold"), py::arg("max_threshold"), py::arg("min_object_px"), py::arg("max_hole_px"),
        py::arg("exclude") = py::none(),
        "Saturation/Otsu tissue mask with small-object and small-hole clean-up, never on `exclude`; returns the threshold.");
  m.def("ink_evidence", &ink_evidence, py::arg("rgb"), py::arg("out"), py::arg("rule"),
        "Per-pixel marker-ink evidence (0 none, 1 possible, 2 certain) under an InkRule given as its integers in order.");
  m.def("ink_mask", &ink_mask, py::arg("rgb"), py::arg("ink"), py::arg("rule"), py::arg("min_strong_px"),
        py::arg("dilate_px"), "Marker ink: evidence components with enough certain pixels, dilated.");
  m.def("cell_fraction", &cell_fraction, py::arg("mask"), py::arg("out"), py::arg("stride_px"), py::arg("size_px"),
        "Per-cell fraction of mask pixels, footprints in mask pixels.");
  m.def("check_jpeg", &check_jpeg, py::arg("data"), py::arg("tables"), py::arg("full_hw"), py::arg("clip_hw"),
        py::arg("components"),
        "'' when data (+ shared JPEGTables, may be empty) is a complete, well-formed JPEG stream whose frame is\n"
        "full_hw or clip_hw (0, 0: unchecked) with `components` components (0: unchecked); else the reason.");
  m.def("check_jpeg_tiles", &check_jpeg_tiles, py::arg("fd"), py::arg("offsets").noconvert(),
        py::arg("sizes").noconvert(), py::arg("clip_hw").noconvert(), py::arg("full_hw"), py::arg("components"),
        py::arg("tables"), py::arg("threads"),
        "check_jpeg for n tiles read from file descriptor fd (pread), OpenMP across tiles; reasons in tile order.");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
