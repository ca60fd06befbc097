// Tensors cross into the extension by DLPack, without copies.
//
// A TensorView borrows the memory of any object with __dlpack__ (torch tensors, numpy
// arrays, CuPy arrays) for the duration of one call. A wrong dtype, device, rank or
// layout is an error, never a silent conversion: the caller chose the buffer so that
// the kernel writes where the next stage reads.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "third_party/dlpack.h"

namespace nic {

namespace py = pybind11;

enum class Dtype { uint8, boolean, int32, float16, bfloat16, float32 };

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::uint8: return "uint8";
    case Dtype::boolean: return "bool";
    case Dtype::int32: return "int32";
    case Dtype::float16: return "float16";
    case Dtype::bfloat16: return "bfloat16";
    case Dtype::float32: return "float32";
  }
  return "?";
}

// Memory order of a 4-d patch batch (N, C, H, W).
enum class Layout { contiguous, channels_last };

// Passed as `cuda_stream` for device arrays whose producer has ordered its writes on the
// launch stream already (torch tensors on torch's current stream): the export asks for
// DLPack's stream -1, no synchronisation, so torch creates and awaits no event per array.
constexpr std::int64_t kOrderedOnStream = -2;

class TensorView {
 public:
  TensorView(py::object obj, const char* name, std::int64_t cuda_stream = -1) : name_(name) {
    if (!py::hasattr(obj, "__dlpack__")) {
      throw py::type_error(std::string(name) + ": expected an array with __dlpack__ (torch tensor, numpy array), got " +
                           std::string(py::str(py::type::of(obj))));
    }
    // The consumer's stream matters only for device memory; host arrays (numpy) refuse one.
    const bool on_device = (cuda_stream >= 0 || cuda_stream == kOrderedOnStream) &&
                           py::hasattr(obj, "__dlpack_device__") &&
                           obj.attr("__dlpack_device__")().cast<py::tuple>()[0].cast<int>() == kDLCUDA;
    const std::int64_t export_stream = cuda_stream == kOrderedOnStream ? -1 : cuda_stream;
    py::object capsule = on_device ? obj.attr("__dlpack__")(py::arg("stream") = export_stream)
                                   : obj.attr("__dlpack__")();
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) throw py::error_already_set();
    // We consume the capsule: rename it so its destructor leaves the tensor to us.
    PyCapsule_SetName(capsule.ptr(), "used_dltensor");
    managed_ = managed;
    owner_ = std::move(obj);
  }
  TensorView(const TensorView&) = delete;
  TensorView& operator=(const TensorView&) = delete;
  ~TensorView() {
    if (managed_ != nullptr && managed_->deleter != nullptr) managed_->deleter(managed_);
  }

  const DLTensor& dl() const { return managed_->dl_tensor; }
  int ndim() const { return dl().ndim; }
  std::int64_t size(int axis) const { return dl().shape[axis]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim(); ++i) n *= size(i);
    return n;
  }
  bool on_cuda() const { return dl().device.device_type == kDLCUDA; }
  int device_id() const { return dl().device.device_id; }
  Dtype dtype() const {
    const DLDataType t = dl().dtype;
    if (t.lanes == 1 && t.code == kDLUInt && t.bits == 8) return Dtype::uint8;
    if (t.lanes == 1 && t.code == kDLBool && t.bits == 8) return Dtype::boolean;
    if (t.lanes == 1 && t.code == kDLInt && t.bits == 32) return Dtype::int32;
    if (t.lanes == 1 && t.code == kDLFloat && t.bits == 16) return Dtype::float16;
    if (t.lanes == 1 && t.code == kDLBfloat && t.bits == 16) return Dtype::bfloat16;
    if (t.lanes == 1 && t.code == kDLFloat && t.bits == 32) return Dtype::float32;
    fail("unsupported dtype " + dtype_text());
  }
  std::string dtype_text() const {
    const DLDataType t = dl().dtype;
    const char* kind = t.code == kDLInt ? "int" : t.code == kDLUInt ? "uint" : t.code == kDLFloat ? "float"
                     : t.code == kDLBfloat ? "bfloat" : t.code == kDLBool ? "bool" : "code";
    return std::string(kind) + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : "");
  }
  template <typename T> T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(dl().data) + dl().byte_offset);
  }

  // Checks ------------------------------------------------------------------------
  TensorView& expect_ndim(int n) {
    if (ndim() != n) fail("expected " + std::to_string(n) + " dimensions, got " + std::to_string(ndim()) + shape_text());
    return *this;
  }
  TensorView& expect_size(int axis, std::int64_t n, const char* what) {
    if (size(axis) != n)
      fail(std::string("dimension ") + std::to_string(axis) + " (" + what + ") must be " + std::to_string(n) + shape_text());
    return *this;
  }
  TensorView& expect_dtype(std::initializer_list<Dtype> allowed) {
    std::string names;
    for (Dtype a : allowed) names += (names.empty() ? "" : " or ") + std::string(dtype_name(a));
    Dtype d;
    try {
      d = dtype();
    } catch (const py::value_error&) {
      fail("expected dtype " + names + ", got " + dtype_text());
    }
    for (Dtype a : allowed)
      if (a == d) return *this;
    fail("expected dtype " + names + ", got " + dtype_text());
  }
  TensorView& expect_device(bool cuda) {
    if (on_cuda() != cuda) fail(cuda ? "must be on a CUDA device" : "must be in host (CPU) memory");
    if (!cuda && dl().device.device_type != kDLCPU && dl().device.device_type != kDLCUDAHost)
      fail("must be in host (CPU) memory");
    return *this;
  }
  TensorView& expect_contiguous() {
    if (!is_row_major()) fail("must be C-contiguous (row-major, no gaps)" + shape_text());
    return *this;
  }
  // A 4-d (N, C, H, W) batch written either row-major or channels-last.
  Layout expect_patch_layout() {
    expect_ndim(4);
    if (is_row_major()) return Layout::contiguous;
    const std::int64_t* s = dl().strides;
    const std::int64_t c = size(1), h = size(2), w = size(3);
    if (s != nullptr && s[1] == 1 && s[3] == c && s[2] == w * c && (size(0) == 1 || s[0] == h * w * c))
      return Layout::channels_last;
    fail("must be contiguous NCHW or channels-last" + shape_text());
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw py::value_error(std::string(name_) + ": " + why);
  }

 private:
  bool is_row_major() const {
    const std::int64_t* s = dl().strides;
    if (s == nullptr) return true;
    std::int64_t expected = 1;
    for (int i = ndim() - 1; i >= 0; --i) {
      if (size(i) != 1 && s[i] != expected) return false;
      expected *= size(i);
    }
    return true;
  }
  std::string shape_text() const {
    std::ostringstream out;
    out << " (shape (";
    for (int i = 0; i < ndim(); ++i) out << (i ? ", " : "") << size(i);
    out << "))";
    return out.str();
  }

  const char* name_;
  DLManagedTensor* managed_ = nullptr;
  py::object owner_;
};

}  // namespace nic
