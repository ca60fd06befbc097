// The JPEG stream walker (see jpeg_check.h). It follows ITU T.81: marker segments, then
// per scan the Huffman-coded MCUs of a sequential (SOF0/SOF1) frame, block by block.
// Coefficient magnitudes are skipped, never reconstructed, which is what makes the walk
// several times cheaper than a decode.
#include "jpeg_check.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nic {
namespace {

constexpr int kFastBits = 10;   // Huffman codes up to this long decode with one table look-up
constexpr int kGroupBits = 13;  // AC symbols inside this many bits are walked as one group

// Marker bytes (the byte after 0xFF).
constexpr int kSOI = 0xD8, kEOI = 0xD9, kSOS = 0xDA, kDQT = 0xDB, kDNL = 0xDC, kDRI = 0xDD, kDHT = 0xC4,
              kDAC = 0xCC, kCOM = 0xFE, kRST0 = 0xD0, kRST7 = 0xD7, kAPP0 = 0xE0, kAPP15 = 0xEF;

struct Bad {
  std::string why;
};

[[noreturn]] void bad(std::string why) { throw Bad{std::move(why)}; }

std::string hex(int byte) {
  char text[8];
  std::snprintf(text, sizeof text, "0x%02X", byte & 0xFF);
  return text;
}

struct Huffman {
  std::int32_t maxcode[18];   // largest code of each length, -1 when there is none
  std::int32_t valoffset[18];  // index into values of a code of each length, minus that code
  std::uint8_t values[256];
  // For codes up to kFastBits long: (bits to skip << 8) | symbol, where the bits to skip
  // are the code and the magnitude bits that follow it (the low nibble of the symbol);
  // 0 for longer codes.
  std::uint16_t fast[1 << kFastBits];
  // AC tables of 8-bit JPEGs: what the next kGroupBits bits hold as a whole, several
  // symbols at once (see group_entry); 0 where the first symbol does not fit.
  std::uint16_t group[1 << kGroupBits];
  bool has_group = false;

  // The symbol whose code is the first `length` bits of `code16` (16 bits, MSB first),
  // or -1 when no code of that length matches.
  int symbol(std::int32_t code16, int length) const {
    const std::int32_t code = code16 >> (16 - length);
    return code <= maxcode[length] && code + valoffset[length] >= 0 ? values[code + valoffset[length]] : -1;
  }
};

// A group entry packs (bits consumed) | (coefficient positions advanced << 4) | (ends
// with end-of-block << 11) for the run of whole AC symbols (code and magnitude bits)
// at the start of `window`; it stops before an invalid symbol, after an end-of-block, and
// before anything that could pass coefficient 64.
std::uint16_t group_entry(const Huffman& h, std::uint32_t window, int max_ac) {
  int used = 0, advanced = 0;
  while (used < kGroupBits) {
    const std::int32_t code16 = static_cast<std::int32_t>((window << used) & ((1u << kGroupBits) - 1)) << (16 - kGroupBits);
    int length = 1, rs = -1;
    for (; length <= kGroupBits - used && rs < 0; ++length) rs = h.symbol(code16, length);
    --length;
    if (rs < 0) break;
    const int run = rs >> 4, size = rs & 15;
    if (used + length + size > kGroupBits) break;
    if (size == 0 && run == 0) return static_cast<std::uint16_t>((used + length) | (advanced << 4) | (1 << 11));
    if (size == 0 && run != 15) break;
    if (size > max_ac) break;
    const int step = size == 0 ? 16 : run + 1;
    if (advanced + step > 64) break;
    used += length + size;
    advanced += step;
  }
  return static_cast<std::uint16_t>(used == 0 ? 0 : used | (advanced << 4));
}

// Canonical code assignment as in T.81 Annex C, with libjpeg's validity rule: a length
// must not run out of codes (which also rules out the all-ones code).
void build_huffman(Huffman& h, const std::uint8_t counts[16], const std::uint8_t* values, int n_values, bool dc) {
  std::memset(h.fast, 0, sizeof h.fast);
  std::memcpy(h.values, values, n_values);
  std::int32_t code = 0;
  int k = 0;
  for (int length = 1; length <= 16; ++length) {
    const int n = counts[length - 1];
    h.valoffset[length] = k - code;
    for (int i = 0; i < n; ++i, ++k, ++code) {
      if (dc && values[k] > 15) bad("a DC Huffman table holds a category > 15");
      if (length <= kFastBits) {
        const int shift = kFastBits - length;
        const int magnitude_bits = values[k] & 15;  // a DC category or an AC size: the bits after the code
        const std::uint16_t entry = static_cast<std::uint16_t>(((length + magnitude_bits) << 8) | values[k]);
        for (int fill = 0; fill < (1 << shift); ++fill) h.fast[(code << shift) | fill] = entry;
      }
    }
    h.maxcode[length] = n ? code - 1 : -1;
    if (code >= (std::int32_t{1} << length)) bad("a Huffman table has more codes than its lengths allow");
    code <<= 1;
  }
  h.maxcode[17] = 0x7FFFFFFF;
  if (!dc) {
    for (std::uint32_t window = 0; window < (1u << kGroupBits); ++window) h.group[window] = group_entry(h, window, 10);
    h.has_group = true;
  }
}

// Built tables by their DHT bytes. Slides share one JPEGTables stream per level (and
// tifffile writes the same tables into every tile), so each table is built once per
// thread, not once per tile: the group table costs more to build than a tile to walk.
class HuffmanCache {
 public:
  const Huffman* get(const std::uint8_t counts[16], const std::uint8_t* values, int n_values, bool dc) {
    for (const Entry& e : entries_)
      if (e.dc == dc && e.n_values == n_values && std::memcmp(e.counts, counts, 16) == 0 &&
          std::memcmp(e.values, values, n_values) == 0)
        return e.table.get();
    Entry e;
    e.dc = dc;
    e.n_values = n_values;
    std::memcpy(e.counts, counts, 16);
    std::memcpy(e.values, values, n_values);
    e.table = std::make_unique<Huffman>();
    build_huffman(*e.table, counts, values, n_values, dc);
    if (entries_.size() == kCapacity) entries_.erase(entries_.begin());
    entries_.push_back(std::move(e));
    return entries_.back().table.get();
  }

 private:
  static constexpr std::size_t kCapacity = 16;
  struct Entry {
    bool dc = false;
    int n_values = 0;
    std::uint8_t counts[16];
    std::uint8_t values[256];
    std::unique_ptr<Huffman> table;
  };
  std::vector<Entry> entries_;
};

// MSB-first bit reader over entropy-coded data: undoes 0xFF 0x00 stuffing and stops at
// the first marker (or the end of the data), feeding zero bits from there on. `real`
// counts the buffered bits that came from the data; it goes negative exactly when the
// walk consumed bits that do not exist.
struct BitReader {
  const std::uint8_t* p;
  const std::uint8_t* end;
  std::uint64_t acc = 0;
  int bits = 0;
  std::int64_t real = 0;
  bool stopped = false;

  BitReader(const std::uint8_t* begin, const std::uint8_t* stop) : p(begin), end(stop) {}

  // Tops the buffer up to at least 32 bits (one symbol takes at most 16 + 15). Where the
  // next eight bytes hold no 0xFF (no stuffing, no marker) they go in at once, without
  // a branch on the fill level: OR-ing in the partial byte past the last whole one is
  // harmless, the next fill writes the same bits there. `bits` stays <= 63.
  __attribute__((always_inline)) void fill() {
    if (!stopped && end - p >= 8) {
      std::uint64_t word;
      std::memcpy(&word, p, 8);
      word = __builtin_bswap64(word);
      const std::uint64_t inverted = ~word;
      if (((inverted - 0x0101010101010101ull) & ~inverted & 0x8080808080808080ull) == 0) {
        const int n = (63 - bits) >> 3;
        acc |= word >> bits;
        p += n;
        bits += 8 * n;
        real += 8 * n;
        return;
      }
    }
    if (bits < 32) fill_bytewise();
  }

  void fill_bytewise() {
    while (bits <= 55) {
      if (!stopped) {
        if (p >= end) {
          stopped = true;
          continue;
        }
        const std::uint8_t byte = *p;
        if (byte == 0xFF) {
          if (p + 1 < end && p[1] == 0x00) {
            p += 2;
          } else {
            stopped = true;  // a marker: the scan's data ends here
            continue;
          }
        } else {
          ++p;
        }
        acc |= std::uint64_t{byte} << (56 - bits);
        real += 8;
      }
      bits += 8;
    }
  }

  void skip(int n) {
    acc <<= n;
    bits -= n;
    real -= n;
  }
  // The next symbol of table `h`, its magnitude bits skipped too; -1 for an invalid code.
  __attribute__((always_inline)) int decode(const Huffman& h) {
    const std::uint16_t entry = h.fast[acc >> (64 - kFastBits)];
    if (entry) {
      skip(entry >> 8);
      return entry & 0xFF;
    }
    const std::int32_t code16 = static_cast<std::int32_t>(acc >> 48);
    for (int length = kFastBits + 1; length <= 16; ++length) {
      const std::int32_t code = code16 >> (16 - length);
      if (code <= h.maxcode[length]) {
        const int symbol = h.values[code + h.valoffset[length]];
        skip(length + (symbol & 15));
        return symbol;
      }
    }
    return -1;
  }
};

struct Component {
  int id = 0, h = 1, v = 1, tq = 0;
  bool scanned = false;
};

class Walker {
 public:
  Walker(const JpegExpect& expect, HuffmanCache& cache) : expect_(expect), cache_(cache) {}

  void tables(const std::uint8_t* data, std::size_t size) {
    p_ = data;
    end_ = data + size;
    if (size < 2 || p_[0] != 0xFF || p_[1] != kSOI) bad("JPEGTables does not start with SOI");
    p_ += 2;
    for (;;) {
      const int marker = next_marker("JPEGTables");
      if (marker == kEOI) return;
      if (marker == kDQT || marker == kDHT || marker == kDRI || (marker >= kAPP0 && marker <= kAPP15) || marker == kCOM)
        segment(marker);
      else
        bad("JPEGTables holds marker " + hex(marker));
    }
  }

  void stream(const std::uint8_t* data, std::size_t size) {
    p_ = data;
    end_ = data + size;
    if (size < 2 || p_[0] != 0xFF || p_[1] != kSOI)
      bad(size < 2 ? "shorter than a JPEG header" : "does not start with SOI (starts " + hex(p_[0]) + " " + hex(p_[1]) + ")");
    p_ += 2;
    bool scanned = false;
    for (;;) {
      const int marker = next_marker("the stream");
      if (marker == kEOI) {
        if (!scanned) bad("EOI before any scan");
        if (sequential_)
          for (int c = 0; c < n_comp_; ++c)
            if (!comp_[c].scanned) bad("EOI before every component was scanned");
        return;
      }
      if (marker == kSOS) {
        if (!have_frame_) bad("scan before the frame header");
        scan();
        scanned = true;
      } else if (marker >= kRST0 && marker <= kRST7) {
        if (!scanned) bad("restart marker outside a scan");  // after a scan's last MCU: tolerated, as by libjpeg
      } else if (marker >= 0xC0 && marker <= 0xCF && marker != kDHT && marker != 0xC8 && marker != kDAC) {
        frame(marker);
      } else if (marker == kDQT || marker == kDHT || marker == kDRI || marker == kDAC ||
                 (marker >= kAPP0 && marker <= kAPP15) || marker == kCOM) {
        segment(marker);
      } else if (marker == kDNL) {
        bad("DNL marker (frame height given after the scan) is not supported");
      } else {
        bad("unexpected marker " + hex(marker));
      }
    }
  }

 private:
  // The marker at p_, skipping fill bytes; p_ ends after it.
  int next_marker(const char* where) {
    if (p_ >= end_) bad(std::string(where) + " ends without EOI (truncated?)");
    if (*p_ != 0xFF) bad("expected a marker, found " + hex(*p_));
    while (p_ < end_ && *p_ == 0xFF) ++p_;
    if (p_ >= end_) bad(std::string(where) + " ends without EOI (truncated?)");
    return *p_++;
  }

  int u8() {
    if (p_ >= end_) bad("a marker segment runs past the end of the data");
    return *p_++;
  }
  int u16() {
    const int hi = u8();
    return (hi << 8) | u8();
  }

  // A marker segment's payload [begin, stop), after checking its length is in bounds.
  const std::uint8_t* payload(int marker) {
    const int length = u16();
    if (length < 2 || p_ + (length - 2) > end_) bad("segment " + hex(marker) + " has a length past the end of the data");
    return p_ + (length - 2);
  }

  void segment(int marker) {
    const std::uint8_t* stop = payload(marker);
    if (marker == kDQT) {
      while (p_ < stop) {
        const int pq_tq = u8();
        if ((pq_tq >> 4) > 1 || (pq_tq & 15) > 3) bad("bad quantisation table header");
        p_ += 64 * ((pq_tq >> 4) + 1);
        if (p_ > stop) bad("a quantisation table runs past its segment");
        qt_[pq_tq & 15] = true;
      }
    } else if (marker == kDHT) {
      while (p_ < stop) {
        const int tc_th = u8();
        if ((tc_th >> 4) > 1 || (tc_th & 15) > 3) bad("bad Huffman table header");
        if (stop - p_ < 16) bad("a Huffman table runs past its segment");
        std::uint8_t counts[16];
        int total = 0;
        for (int i = 0; i < 16; ++i) total += counts[i] = *p_++;
        if (total > 256 || stop - p_ < total) bad("a Huffman table runs past its segment");
        const bool dc = (tc_th >> 4) == 0;
        (dc ? dc_ : ac_)[tc_th & 15] = cache_.get(counts, p_, total, dc);
        p_ += total;
      }
    } else if (marker == kDRI) {
      if (stop - p_ != 2) bad("DRI segment has the wrong length");
      restart_interval_ = u16();
    }
    p_ = stop;
  }

  void frame(int marker) {
    if (have_frame_) bad("two frame headers");
    const std::uint8_t* stop = payload(marker);
    sequential_ = marker == 0xC0 || marker == 0xC1;
    precision_ = u8();
    height_ = u16();
    width_ = u16();
    n_comp_ = u8();
    if (sequential_ && precision_ != 8 && precision_ != 12) bad("sample precision " + std::to_string(precision_));
    if (n_comp_ < 1 || n_comp_ > 4) bad(std::to_string(n_comp_) + " components in the frame");
    if (stop - p_ != 3 * n_comp_) bad("frame header has the wrong length");
    for (int c = 0; c < n_comp_; ++c) {
      comp_[c].id = u8();
      const int hv = u8();
      comp_[c].h = hv >> 4;
      comp_[c].v = hv & 15;
      comp_[c].tq = u8();
      if (comp_[c].h < 1 || comp_[c].h > 4 || comp_[c].v < 1 || comp_[c].v > 4) bad("bad sampling factors");
      if (comp_[c].tq > 3) bad("bad quantisation table number");
      h_max_ = std::max(h_max_, comp_[c].h);
      v_max_ = std::max(v_max_, comp_[c].v);
    }
    if (height_ == 0 || width_ == 0) bad("frame of size " + std::to_string(height_) + "x" + std::to_string(width_));
    const bool full = height_ == expect_.full_height && width_ == expect_.full_width;
    const bool clipped = height_ == expect_.clip_height && width_ == expect_.clip_width;
    if (expect_.full_height > 0 && !full && !clipped)
      bad("frame is " + std::to_string(height_) + "x" + std::to_string(width_) + " px, the TIFF tile " +
          std::to_string(expect_.full_height) + "x" + std::to_string(expect_.full_width));
    if (expect_.components > 0 && n_comp_ != expect_.components)
      bad("frame has " + std::to_string(n_comp_) + " components, the TIFF tile " + std::to_string(expect_.components));
    have_frame_ = true;
  }

  void scan() {
    const std::uint8_t* stop = payload(kSOS);
    const int ns = u8();
    if (ns < 1 || ns > n_comp_ || stop - p_ != 2 * ns + 3) bad("bad scan header");
    const Huffman* dc[4];
    const Huffman* ac[4];
    int members[4];
    for (int i = 0; i < ns; ++i) {
      const int id = u8();
      const int tables = u8();
      int c = 0;
      while (c < n_comp_ && comp_[c].id != id) ++c;
      if (c == n_comp_) bad("scan names component " + std::to_string(id) + ", which the frame lacks");
      members[i] = c;
      dc[i] = dc_[(tables >> 4) & 3];
      ac[i] = ac_[tables & 3];
      if ((tables >> 4) > 3 || (tables & 15) > 3) bad("bad Huffman table numbers in the scan header");
    }
    const int ss = u8(), se = u8(), ah_al = u8();
    p_ = stop;
    if (!sequential_) {
      skip_entropy();
      return;
    }
    if (ss != 0 || se != 63 || ah_al != 0) bad("scan parameters are not those of a sequential JPEG");
    for (int i = 0; i < ns; ++i) {
      Component& comp = comp_[members[i]];
      if (comp.scanned) bad("component scanned twice");
      comp.scanned = true;
      if (!qt_[comp.tq]) bad("quantisation table " + std::to_string(comp.tq) + " is not defined");
      if (dc[i] == nullptr || ac[i] == nullptr) bad("the scan uses an undefined Huffman table");
    }
    // The MCU layout (T.81 A.2): one block per MCU in a single-component scan, else
    // H x V blocks of each component.
    std::int64_t mcus;
    const Huffman* block_dc[10];
    const Huffman* block_ac[10];
    int blocks = 0;
    if (ns == 1) {
      const Component& comp = comp_[members[0]];
      const std::int64_t comp_w = (std::int64_t{width_} * comp.h + h_max_ - 1) / h_max_;
      const std::int64_t comp_h = (std::int64_t{height_} * comp.v + v_max_ - 1) / v_max_;
      mcus = ((comp_w + 7) / 8) * ((comp_h + 7) / 8);
      block_dc[0] = dc[0];
      block_ac[0] = ac[0];
      blocks = 1;
    } else {
      mcus = ((width_ + 8 * h_max_ - 1) / (8 * h_max_)) * std::int64_t{(height_ + 8 * v_max_ - 1) / (8 * v_max_)};
      for (int i = 0; i < ns; ++i) {
        const Component& comp = comp_[members[i]];
        for (int b = 0; b < comp.h * comp.v; ++b) {
          if (blocks == 10) bad("more than 10 blocks per MCU");
          block_dc[blocks] = dc[i];
          block_ac[blocks++] = ac[i];
        }
      }
    }
    const int max_dc = precision_ == 8 ? 11 : 15;
    const int max_ac = precision_ == 8 ? 10 : 14;
    BitReader bits(p_, end_);
    int restarts = 0;
    for (std::int64_t mcu = 0; mcu < mcus; ++mcu) {
      if (restart_interval_ && mcu > 0 && mcu % restart_interval_ == 0) {
        end_of_interval(bits, mcu, mcus);
        const int marker = next_marker("the stream");
        if (marker != kRST0 + (restarts & 7))
          bad("expected restart marker " + std::to_string(restarts & 7) + " before MCU " + std::to_string(mcu) +
              ", found " + hex(marker));
        ++restarts;
        bits = BitReader(p_, end_);
      }
      for (int b = 0; b < blocks; ++b) block(bits, *block_dc[b], *block_ac[b], max_dc, max_ac);
      if (bits.real < 0)
        bad("entropy data ends inside MCU " + std::to_string(mcu + 1) + " of " + std::to_string(mcus) +
            (bits.p < end_ ? " (runs into a marker)" : " (truncated)"));
    }
    end_of_interval(bits, mcus, mcus);
  }

  // After the last MCU of a restart interval or scan only the padding of its last byte
  // may remain before the next marker; p_ ends on that marker.
  void end_of_interval(const BitReader& bits, std::int64_t mcu, std::int64_t mcus) {
    std::int64_t extra = bits.real / 8;
    p_ = bits.p;
    if (!bits.stopped) {
      while (p_ < end_ && !(p_[0] == 0xFF && (p_ + 1 >= end_ || p_[1] != 0x00))) {
        p_ += p_[0] == 0xFF ? 2 : 1;
        ++extra;
      }
    }
    if (extra > 0)
      bad(std::to_string(extra) + " bytes of entropy data after MCU " + std::to_string(mcu) + " of " +
          std::to_string(mcus) + " (the scan holds more data than its MCUs)");
  }

  // Inlined into the MCU loop so that the bit reader lives in registers.
  __attribute__((always_inline)) static void block(BitReader& bits, const Huffman& dc, const Huffman& ac, int max_dc, int max_ac) {
    bits.fill();
    const int category = bits.decode(dc);
    if (category < 0) bad("invalid DC Huffman code");
    if (category > max_dc) bad("DC difference category " + std::to_string(category) + " is out of range");
    const bool groups = ac.has_group && max_ac == 10;
    for (int k = 1; k < 64;) {
      bits.fill();
      if (groups) {
        const std::uint16_t group = ac.group[bits.acc >> (64 - kGroupBits)];
        const int advanced = (group >> 4) & 127;
        const bool end_of_block = group >> 11;
        // The group may not end the block early: after coefficient 63 the next bits belong to the next block.
        if (group != 0 && (end_of_block ? k + advanced < 64 : k + advanced <= 64)) {
          bits.skip(group & 15);
          if (end_of_block) break;
          k += advanced;
          continue;
        }
      }
      const int rs = bits.decode(ac);
      if (rs < 0) bad("invalid AC Huffman code");
      const int run = rs >> 4, size = rs & 15;
      if (size == 0) {
        if (run == 0) break;  // end of block
        if (run != 15) bad("invalid AC run/size symbol " + hex(rs));
        k += 16;  // sixteen zeros
        if (k > 64) bad("coefficient index past 63");
        continue;
      }
      k += run;
      if (k > 63) bad("coefficient index past 63");
      if (size > max_ac) bad("AC coefficient size " + std::to_string(size) + " is out of range");
      ++k;
    }
  }

  // Progressive, lossless and arithmetic scans: skip to the next marker that is not a
  // restart marker.
  void skip_entropy() {
    while (p_ + 1 < end_) {
      if (p_[0] != 0xFF || p_[1] == 0x00) {
        p_ += p_[0] == 0xFF ? 2 : 1;
      } else if (p_[1] >= kRST0 && p_[1] <= kRST7) {
        p_ += 2;
      } else if (p_[1] == 0xFF) {
        ++p_;
      } else {
        return;
      }
    }
    bad("the stream ends inside a scan (truncated?)");
  }

  JpegExpect expect_;
  const std::uint8_t* p_ = nullptr;
  const std::uint8_t* end_ = nullptr;
  HuffmanCache& cache_;
  const Huffman* dc_[4] = {nullptr, nullptr, nullptr, nullptr};
  const Huffman* ac_[4] = {nullptr, nullptr, nullptr, nullptr};
  bool qt_[4] = {false, false, false, false};
  int restart_interval_ = 0;
  bool have_frame_ = false, sequential_ = false;
  int precision_ = 8, height_ = 0, width_ = 0, n_comp_ = 0, h_max_ = 1, v_max_ = 1;
  Component comp_[4];
};

std::string check_jpeg_cached(const std::uint8_t* data, std::size_t size, const std::uint8_t* tables,
                              std::size_t tables_size, const JpegExpect& expect, HuffmanCache& cache) {
  Walker walker(expect, cache);
  try {
    if (tables_size > 0) walker.tables(tables, tables_size);
    walker.stream(data, size);
  } catch (const Bad& b) {
    return b.why.empty() ? "corrupt" : b.why;
  }
  return "";
}

}  // namespace

std::string check_jpeg(const std::uint8_t* data, std::size_t size, const std::uint8_t* tables,
                       std::size_t tables_size, const JpegExpect& expect) {
  thread_local HuffmanCache cache;  // kept across calls: the tiles of a slide share their tables
  return check_jpeg_cached(data, size, tables, tables_size, expect, cache);
}

std::vector<std::string> check_jpeg_tiles(int fd, const std::vector<JpegTile>& tiles, const std::uint8_t* tables,
                                          std::size_t tables_size, int threads) {
  const std::int64_t n = static_cast<std::int64_t>(tiles.size());
  std::vector<std::string> reasons(tiles.size());
#ifdef _OPENMP
  const int team = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel num_threads(team) if (n > 1 && team > 1)
#endif
  {
    thread_local std::vector<std::uint8_t> buffer;
    thread_local HuffmanCache cache;  // kept across calls: the tiles of a slide share their tables
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (std::int64_t i = 0; i < n; ++i) {
      const JpegTile& tile = tiles[i];
      buffer.resize(static_cast<std::size_t>(tile.size));
      std::int64_t done = 0;
      while (done < tile.size) {
        const ssize_t got = pread(fd, buffer.data() + done, tile.size - done, tile.offset + done);
        if (got <= 0) break;
        done += got;
      }
      if (done < tile.size)
        reasons[i] = "cannot read its " + std::to_string(tile.size) + " bytes at offset " + std::to_string(tile.offset);
      else
        reasons[i] = check_jpeg_cached(buffer.data(), buffer.size(), tables, tables_size, tile.expect, cache);
    }
  }
  return reasons;
}

}  // namespace nic
