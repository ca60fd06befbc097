// CUDA kernels over the element functions of elements.h. Launch only: argument
// checking happens in bindings.h, on the host.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "elements.h"
#include "kernels_cuda.h"

namespace nic {

namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// One thread per output pixel (n, y, x), all channels: consecutive threads walk x, so
// the writes of each channel plane are coalesced.
template <typename Out>
__global__ void patchify_kernel(PatchifyArgs a) {
  const std::int64_t P = a.patch_px, C = a.channels;
  const std::int64_t total = a.n_cells * P * P;
  Out* out = static_cast<Out*>(a.out);
  for (std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; t < total;
       t += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t x = t % P, y = (t / P) % P, n = t / (P * P);
    const std::int64_t y0 = a.cells[2 * n], x0 = a.cells[2 * n + 1];
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= C) break;
      const float v = patchify_value(a.region, a.region_width, a.channels, y0, x0, a.patch_px, a.downsample,
                                     a.dihedral, int(y), int(x), c, a.scale[c], a.offset[c]);
      const std::int64_t index = a.out_channels_last ? ((n * P + y) * P + x) * C + c : ((n * C + c) * P + y) * P + x;
      Store<Out>::put(out + index, v);
    }
  }
}

template <typename In, typename Out>
__global__ void scatter_kernel(ScatterArgs a) {
  const In* emb = static_cast<const In*>(a.embeddings);
  Out* grid = static_cast<Out*>(a.grid);
  const std::int64_t total = a.n_cells * a.code_size;
  for (std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; t < total;
       t += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t n = t / a.code_size, c = t % a.code_size;
    const std::int64_t i = a.cells[2 * n], j = a.cells[2 * n + 1];
    if (i < 0 || j < 0 || i >= a.grid_height || j >= a.grid_width) continue;  // checked on the host; never write outside
    Store<Out>::put(grid + (i * a.grid_width + j) * a.code_size + c, Store<In>::get(emb + t));
  }
}

unsigned blocks_for(std::int64_t total, unsigned threads) {
  const std::int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

}  // namespace

void patchify_cuda(const PatchifyArgs& a, void* stream) {
  const std::int64_t total = a.n_cells * a.patch_px * a.patch_px;
  if (total == 0) return;
  constexpr unsigned threads = 256;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.out_half) patchify_kernel<std::uint16_t><<<blocks_for(total, threads), threads, 0, s>>>(a);
  else patchify_kernel<float><<<blocks_for(total, threads), threads, 0, s>>>(a);
  check_launch("patchify (CUDA)");
}

void scatter_cuda(const ScatterArgs& a, void* stream) {
  const std::int64_t total = a.n_cells * a.code_size;
  if (total == 0) return;
  constexpr unsigned threads = 256;
  const unsigned blocks = blocks_for(total, threads);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.embeddings_half && a.grid_half) scatter_kernel<std::uint16_t, std::uint16_t><<<blocks, threads, 0, s>>>(a);
  else if (a.embeddings_half) scatter_kernel<std::uint16_t, float><<<blocks, threads, 0, s>>>(a);
  else if (a.grid_half) scatter_kernel<float, std::uint16_t><<<blocks, threads, 0, s>>>(a);
  else scatter_kernel<float, float><<<blocks, threads, 0, s>>>(a);
  check_launch("scatter (CUDA)");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace nic
