// CUDA kernels over the element functions of elements.h. Launch only: argument
// checking happens in bindings.h, on the host.
//
// Both kernels move memory in 16-byte vectors whenever pointers and row pitches allow
// it (the common case: 128-px patches, 16-cell tiles, code sizes that are multiples of
// 8), and fall back to element accesses otherwise, so every size stays correct. The
// arithmetic of each output element is the one in elements.h, shared with the CPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "elements.h"
#include "kernels_cuda.h"

namespace nic {

namespace {

constexpr unsigned kThreads = 256;
constexpr int kVectorBytes = 16;
constexpr int kSourceSidePx = 64;               // a block's staged source square, in region pixels
constexpr int kAlignPx = 16;                    // staged rows start on a 16-px column: 16-byte aligned for any C
constexpr std::int64_t kMaxSharedBytes = 48 * 1024;  // the default per-block limit, no opt-in needed

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0; }

// -- packing 16-byte vectors -----------------------------------------------------------
// Words are built from compile-time indices so that the values stay in registers.
template <typename Out> struct Pack;
template <> struct Pack<float> {
  static constexpr int kLanes = 4;
  __device__ static std::uint32_t word(const float* v, int w) { return __float_as_uint(v[w]); }
};
template <typename Half> struct Pack16 {
  static constexpr int kLanes = 8;
  __device__ static std::uint32_t word(const float* v, int w) {
    return static_cast<std::uint32_t>(Store<Half>::bits(v[2 * w])) |
           (static_cast<std::uint32_t>(Store<Half>::bits(v[2 * w + 1])) << 16);
  }
};
template <> struct Pack<std::uint16_t> : Pack16<std::uint16_t> {};
template <> struct Pack<Bf16Bits> : Pack16<Bf16Bits> {};

template <typename Out>
__device__ __forceinline__ void store_vector(Out* dst, const float* v) {
  using P = Pack<Out>;
  *reinterpret_cast<uint4*>(dst) = make_uint4(P::word(v, 0), P::word(v, 1), P::word(v, 2), P::word(v, 3));
}

// Eight (or four) values from a 16-byte-aligned vector load.
template <typename In> struct Unpack;
template <> struct Unpack<float> {
  __device__ static void load(const float* src, float* v) {  // 4 lanes per vector: two loads for 8
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(src)), b = __ldg(reinterpret_cast<const uint4*>(src) + 1);
    v[0] = __uint_as_float(a.x); v[1] = __uint_as_float(a.y); v[2] = __uint_as_float(a.z); v[3] = __uint_as_float(a.w);
    v[4] = __uint_as_float(b.x); v[5] = __uint_as_float(b.y); v[6] = __uint_as_float(b.z); v[7] = __uint_as_float(b.w);
  }
};
template <typename Half> struct Unpack16 {
  __device__ static void load(const Half* src, float* v) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(src));
    const std::uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Store<Half>::value(static_cast<std::uint16_t>(w[i] & 0xffffu));
      v[2 * i + 1] = Store<Half>::value(static_cast<std::uint16_t>(w[i] >> 16));
    }
  }
};
template <> struct Unpack<std::uint16_t> : Unpack16<std::uint16_t> {};
template <> struct Unpack<Bf16Bits> : Unpack16<Bf16Bits> {};

// -- patchify ------------------------------------------------------------------------------
// Each block makes one square tile of one output patch. The tile's source pixels (a
// square of the region, wherever the dihedral transform takes them from) are first
// copied to shared memory with coalesced 16-byte loads; the element function then
// reads them there, so rotated and mirrored patches cost the same as identity ones.
// The tile is written row segment by row segment, kLanes consecutive elements per
// thread, as one 16-byte store each.
struct PatchifyTiling {
  int tile_px;         // output tile side (a power of two)
  int tiles_per_side;  // ceil(patch_px / tile_px)
  bool staged;         // source square fits shared memory
  bool vector_in;      // staging copies 16-byte vectors
  bool vector_out;     // every output row segment is whole 16-byte vectors
  int smem_pitch_px;   // width of a staged row (bank-conflict padding included)
};

struct SourceWindow {  // where a tile's source pixels are, in region and in staging coordinates
  std::int64_t row0, col0;  // region pixel of staged (0, 0)
  int rows, cols;           // staged extent
  std::int64_t patch_y0, patch_x0;  // the patch origin in staging coordinates
};

__device__ SourceWindow source_window(const PatchifyArgs& a, const PatchifyTiling& t, std::int64_t cell_y,
                                      std::int64_t cell_x, int oy0, int ox0, int th, int tw) {
  int y_a, x_a, y_b, x_b;  // source pixels (in the patch) of two opposite tile corners
  dihedral_source(a.dihedral, a.patch_px, oy0, ox0, &y_a, &x_a);
  dihedral_source(a.dihedral, a.patch_px, oy0 + th - 1, ox0 + tw - 1, &y_b, &x_b);
  const int sy = min(y_a, y_b), sx = min(x_a, x_b);
  const int side_y = (max(y_a, y_b) - sy + 1) * a.downsample, side_x = (max(x_a, x_b) - sx + 1) * a.downsample;
  SourceWindow w;
  w.row0 = cell_y + std::int64_t(sy) * a.downsample;
  const std::int64_t first_col = cell_x + std::int64_t(sx) * a.downsample;
  std::int64_t end_col = first_col + side_x;
  w.col0 = first_col;
  if (t.vector_in) {  // widen to 16-px columns so every staged row is whole 16-byte vectors
    w.col0 = first_col / kAlignPx * kAlignPx;
    end_col = min((end_col + kAlignPx - 1) / kAlignPx * kAlignPx, a.region_width);
  }
  w.rows = side_y;
  w.cols = static_cast<int>(end_col - w.col0);
  w.patch_y0 = -std::int64_t(sy) * a.downsample;
  w.patch_x0 = cell_x - w.col0;
  return w;
}

__device__ void stage_source(const PatchifyArgs& a, const PatchifyTiling& t, const SourceWindow& w,
                             std::uint8_t* smem) {
  const int C = a.channels;
  const int row_bytes = w.cols * C, pitch_bytes = t.smem_pitch_px * C;
  if (t.vector_in) {
    const int vectors = row_bytes / kVectorBytes;
    for (int k = threadIdx.x; k < w.rows * vectors; k += blockDim.x) {
      const int r = k / vectors, v = k % vectors;
      const std::uint8_t* src = a.region + ((w.row0 + r) * a.region_width + w.col0) * C + v * kVectorBytes;
      *reinterpret_cast<uint4*>(smem + r * pitch_bytes + v * kVectorBytes) = __ldg(reinterpret_cast<const uint4*>(src));
    }
  } else {
    for (int k = threadIdx.x; k < w.rows * row_bytes; k += blockDim.x) {
      const int r = k / row_bytes, b = k % row_bytes;
      smem[r * pitch_bytes + b] = a.region[((w.row0 + r) * a.region_width + w.col0) * C + b];
    }
  }
}

// A per-channel kernel parameter by run-time channel: selects, not an indexed load, which
// would copy the parameter block to local memory.
__device__ __forceinline__ float channel_param(const float (&values)[kMaxChannels], int c) {
  return c == 0 ? values[0] : c == 1 ? values[1] : c == 2 ? values[2] : values[3];
}

template <typename Out, int kChannels>
__global__ void __launch_bounds__(kThreads) patchify_kernel(PatchifyArgs a, PatchifyTiling t) {
  extern __shared__ uint4 smem_vectors[];
  auto* smem = reinterpret_cast<std::uint8_t*>(smem_vectors);
  constexpr int kLanes = Pack<Out>::kLanes;
  const int C = kChannels > 0 ? kChannels : a.channels;
  const int P = a.patch_px, T = t.tile_px;
  const int tiles = t.tiles_per_side * t.tiles_per_side;
  const std::int64_t n = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int oy0 = (tile / t.tiles_per_side) * T, ox0 = (tile % t.tiles_per_side) * T;
  const int th = min(T, P - oy0), tw = min(T, P - ox0);
  const std::int64_t cell_y = a.cells[2 * n], cell_x = a.cells[2 * n + 1];

  const std::uint8_t* src = a.region;
  std::int64_t src_width = a.region_width, patch_y0 = cell_y, patch_x0 = cell_x;
  if (t.staged) {
    const SourceWindow w = source_window(a, t, cell_y, cell_x, oy0, ox0, th, tw);
    stage_source(a, t, w, smem);
    __syncthreads();
    src = smem;
    src_width = t.smem_pitch_px;
    patch_y0 = w.patch_y0;
    patch_x0 = w.patch_x0;
  }

  // Row segments: channels-last has one of tw * C elements per tile row, NCHW one of
  // tw elements per tile row and channel.
  const bool last = a.out_channels_last;
  const int segment_len = last ? tw * C : tw;
  const int segments = last ? th : th * C;
  const int groups = (segment_len + kLanes - 1) / kLanes;
  Out* out = static_cast<Out*>(a.out);
  for (int g = threadIdx.x; g < segments * groups; g += blockDim.x) {
    const int segment = g / groups, e0 = (g % groups) * kLanes;
    const int y = oy0 + (last ? segment : segment % th);
    const int seg_c = last ? 0 : segment / th;
    const std::int64_t base = last ? ((n * P + y) * P + ox0) * C : ((n * C + seg_c) * P + y) * P + ox0;
    float v[kLanes];
#pragma unroll
    for (int i = 0; i < kLanes; ++i) {
      const int e = min(e0 + i, segment_len - 1);  // lanes past the end repeat the last element, unused
      const int x = ox0 + (last ? e / C : e), c = last ? e % C : seg_c;
      v[i] = patchify_value(src, src_width, C, patch_y0, patch_x0, P, a.downsample, a.dihedral, y, x, c,
                            channel_param(a.scale, c), channel_param(a.offset, c));
    }
    if (t.vector_out) {
      store_vector(out + base + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < kLanes; ++i)
        if (e0 + i < segment_len) Store<Out>::put(out + base + e0 + i, v[i]);
    }
  }
}

int element_bytes(Element e) { return e == Element::float32 ? 4 : 2; }

PatchifyTiling patchify_tiling(const PatchifyArgs& a) {
  PatchifyTiling t{};
  int tile = 1;  // the largest power of two whose source square is at most kSourceSidePx
  while (tile * 2 * a.downsample <= kSourceSidePx && tile * 2 <= a.patch_px) tile *= 2;
  t.tile_px = tile;
  t.tiles_per_side = (a.patch_px + tile - 1) / tile;
  const int C = a.channels, es = element_bytes(a.out_type);
  const int tile_row_bytes = (a.out_channels_last ? tile * C : tile) * es;
  t.vector_out = aligned16(a.out) && a.patch_px % tile == 0 && tile_row_bytes % kVectorBytes == 0;
  t.vector_in = aligned16(a.region) && (a.region_width * C) % kVectorBytes == 0;
  // Staged rows: the source side plus up to 2 * kAlignPx of widening; padded so that a
  // row is an odd number of 16-byte vectors (consecutive rows then start in different
  // shared-memory banks, which matters for the transposing transforms).
  const int side = tile * a.downsample;
  int pitch = ((side + 2 * kAlignPx) + kAlignPx - 1) / kAlignPx * kAlignPx;
  const int pad_px = C == 3 ? kAlignPx : kVectorBytes / C;  // one odd number of vectors
  if (((pitch * C) / kVectorBytes) % 2 == 0) pitch += pad_px;
  t.smem_pitch_px = pitch;
  t.staged = std::int64_t(side) * pitch * C <= kMaxSharedBytes;
  return t;
}

template <typename Out, int kChannels>
void launch_patchify(const PatchifyArgs& a, const PatchifyTiling& t, cudaStream_t s) {
  const std::int64_t blocks = a.n_cells * t.tiles_per_side * t.tiles_per_side;
  const size_t smem = t.staged ? size_t(t.tile_px) * a.downsample * t.smem_pitch_px * a.channels : 0;
  patchify_kernel<Out, kChannels><<<static_cast<unsigned>(blocks), kThreads, smem, s>>>(a, t);
}

template <typename Out>
void patchify_typed(const PatchifyArgs& a, const PatchifyTiling& t, cudaStream_t s) {
  if (a.channels == 3) launch_patchify<Out, 3>(a, t, s);
  else launch_patchify<Out, 0>(a, t, s);
}

// -- scatter -------------------------------------------------------------------------------
// One thread moves 8 consecutive codes of one cell: one or two 16-byte loads, one or two
// 16-byte stores when the code size is a multiple of 8 and the arrays are aligned.
constexpr int kScatterLanes = 8;

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) scatter_kernel(ScatterArgs a, bool vector) {
  const In* emb = static_cast<const In*>(a.embeddings);
  Out* grid = static_cast<Out*>(a.grid);
  const std::int64_t groups = (a.code_size + kScatterLanes - 1) / kScatterLanes;
  const std::int64_t total = a.n_cells * groups;
  for (std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; t < total;
       t += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t n = t / groups, c0 = (t % groups) * kScatterLanes;
    const std::int64_t i = a.cells[2 * n], j = a.cells[2 * n + 1];
    if (i < 0 || j < 0 || i >= a.grid_height || j >= a.grid_width) continue;  // checked on the host; never write outside
    const In* from = emb + n * a.code_size + c0;
    Out* to = grid + (i * a.grid_width + j) * a.code_size + c0;
    if (vector) {
      float v[kScatterLanes];
      Unpack<In>::load(from, v);
      store_vector(to, v);
      if (Pack<Out>::kLanes < kScatterLanes) store_vector(to + Pack<Out>::kLanes, v + Pack<Out>::kLanes);
    } else {
      for (std::int64_t c = 0; c < kScatterLanes && c0 + c < a.code_size; ++c) Store<Out>::put(to + c, Store<In>::get(from + c));
    }
  }
}

unsigned blocks_for(std::int64_t total, unsigned threads) {
  const std::int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

template <typename In>
void scatter_typed(const ScatterArgs& a, bool vector, unsigned blocks, cudaStream_t s) {
  if (a.grid_half) scatter_kernel<In, std::uint16_t><<<blocks, kThreads, 0, s>>>(a, vector);
  else scatter_kernel<In, float><<<blocks, kThreads, 0, s>>>(a, vector);
}

}  // namespace

void patchify_cuda(const PatchifyArgs& a, void* stream) {
  if (a.n_cells == 0) return;
  const PatchifyTiling t = patchify_tiling(a);
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.out_type) {
    case Element::float16: patchify_typed<std::uint16_t>(a, t, s); break;
    case Element::bfloat16: patchify_typed<Bf16Bits>(a, t, s); break;
    case Element::float32: patchify_typed<float>(a, t, s); break;
  }
  check_launch("patchify (CUDA)");
}

void scatter_cuda(const ScatterArgs& a, void* stream) {
  const std::int64_t total = a.n_cells * ((a.code_size + kScatterLanes - 1) / kScatterLanes);
  if (total == 0) return;
  const bool vector = a.code_size % kScatterLanes == 0 && aligned16(a.embeddings) && aligned16(a.grid);
  const unsigned blocks = blocks_for(total, kThreads);
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.embeddings_type) {
    case Element::float16: scatter_typed<std::uint16_t>(a, vector, blocks, s); break;
    case Element::bfloat16: scatter_typed<Bf16Bits>(a, vector, blocks, s); break;
    case Element::float32: scatter_typed<float>(a, vector, blocks, s); break;
  }
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
