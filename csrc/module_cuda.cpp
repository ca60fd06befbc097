// nic_fast._C_cuda: the CUDA kernels. Built only where CMake finds nvcc, imported
// lazily by nic_fast.kernels so that `import nic_fast` needs no driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "bindings.h"
#include "kernels_cuda.h"

namespace py = pybind11;
using nic::TensorView;

namespace {

void* as_stream(std::int64_t stream) { return reinterpret_cast<void*>(static_cast<std::intptr_t>(stream)); }

// The stream the arrays are exported for: none to wait on when their producer ordered them
// on `stream` already (`ordered`); else `stream`, where DLPack reserves 0 (ambiguous) and
// the legacy default stream is 1.
std::int64_t dlpack_stream(std::int64_t stream, bool ordered) {
  if (ordered) return nic::kOrderedOnStream;
  return stream == 0 ? 1 : stream;
}

void patchify(py::object region, py::object cells, py::object out, int downsample, int dihedral,
              const std::vector<float>& scale, const std::vector<float>& offset, std::int64_t stream, bool ordered) {
  const std::int64_t s = dlpack_stream(stream, ordered);
  TensorView r(std::move(region), "region", s), c(std::move(cells), "cells", s), o(std::move(out), "out", s);
  const nic::PatchifyArgs args = nic::patchify_args(r, c, o, downsample, dihedral, scale, offset, true);
  py::gil_scoped_release release;
  nic::patchify_cuda(args, as_stream(stream));
}

void scatter(py::object embeddings, py::object cells, py::object grid, std::int64_t stream, bool ordered) {
  const std::int64_t s = dlpack_stream(stream, ordered);
  TensorView e(std::move(embeddings), "embeddings", s), c(std::move(cells), "cells", s),
      g(std::move(grid), "grid", s);
  const nic::ScatterArgs args = nic::scatter_args(e, c, g, true);
  py::gil_scoped_release release;
  nic::scatter_cuda(args, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "nic-fast CUDA kernels. Arrays cross by DLPack, without copies; launches are asynchronous on `stream`.";
  m.def("patchify", &patchify, py::arg("region"), py::arg("cells"), py::arg("out"), py::arg("downsample"),
        py::arg("dihedral"), py::arg("scale"), py::arg("offset"), py::arg("stream"), py::arg("ordered") = false);
  m.def("scatter", &scatter, py::arg("embeddings"), py::arg("cells"), py::arg("grid"), py::arg("stream"),
        py::arg("ordered") = false);
  m.def("device_count", &nic::device_count, "CUDA devices visible to the runtime (0 without a driver).");
}
