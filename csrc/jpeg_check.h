// Integrity check of JPEG tile streams without decoding them.
//
// libjpeg (and so cuCIM and imagecodecs) only *warns* on corrupt entropy-coded data and
// hands back grey or garbled pixels; a slide store must never take those for tissue.
// The check walks the Huffman-coded data of a sequential JPEG exactly as a decoder
// would, without dequantising or transforming anything: every code must exist in its
// table, every coefficient index must stay <= 63, restart markers must come in order
// after every restart interval, the scan must hold exactly the MCUs the frame header
// implies, and the stream must end in EOI with no stray bytes before it. Progressive,
// lossless and arithmetic-coded streams get the marker-level (structural) check only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nic {

// What a tile's frame header must say: the TIFF tile (or strip) size, or the part of it
// inside the image (some writers encode edge tiles clipped), and the component count.
struct JpegExpect {
  int full_height = 0, full_width = 0;  // 0: not checked
  int clip_height = 0, clip_width = 0;
  int components = 0;  // 0: not checked
};

// "" when `data` (with the shared JPEGTables stream `tables`, may be empty) is a complete,
// well-formed JPEG stream that matches `expect`; otherwise the reason, one short phrase.
std::string check_jpeg(const std::uint8_t* data, std::size_t size, const std::uint8_t* tables,
                       std::size_t tables_size, const JpegExpect& expect);

// One tile of a batch: where its bytes are in the file, and what its frame must say.
struct JpegTile {
  std::int64_t offset = 0, size = 0;
  JpegExpect expect;
};

// check_jpeg for each tile, reading each tile's bytes from `fd` with pread, `threads`
// tiles at a time (OpenMP; 0 = its default). Reasons in tile order, "" for good tiles.
std::vector<std::string> check_jpeg_tiles(int fd, const std::vector<JpegTile>& tiles, const std::uint8_t* tables,
                                          std::size_t tables_size, int threads);

}  // namespace nic
