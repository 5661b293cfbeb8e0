#include "image/jpeg_decoder.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>

#include "common/error.h"

namespace trellis::image {
namespace {

[[noreturn]] void Corrupt(const std::string& what) { throw NativeError("ERR_IMAGE_DECODE", "JPEG: " + what); }
[[noreturn]] void Unsupported(const std::string& what) { throw NativeError("ERR_IMAGE_UNSUPPORTED", "JPEG: " + what); }

// Position k of the zigzag order holds the coefficient at natural (row-major) index kZigzag[k].
constexpr std::array<uint8_t, 64> kZigzag = {0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
                                             12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
                                             35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
                                             58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

constexpr int kFastBits = 9;

// Buffers reused from one image to the next on a thread (decoding is synchronous, one image at a
// time per thread): a fresh large allocation is pages the kernel must fault in and zero, which
// cost a tenth of a decode. Buffers past kKeptBytes are let go after the image.
struct Scratch {
  std::array<std::vector<int16_t>, 4> coefficients;
  std::array<std::vector<uint8_t>, 4> samples;
  std::array<std::vector<uint8_t>, 4> full;
};
thread_local Scratch scratch;
constexpr size_t kKeptBytes = 64u << 20;

template <typename T>
void ReleaseIfLarge(std::vector<T>& buffer) {
  if (buffer.capacity() * sizeof(T) > kKeptBytes) std::vector<T>().swap(buffer);
}

// A plane of 8-bit samples and the bytes from one row to the next.
struct Plane {
  const uint8_t* data;
  size_t stride;
};

struct HuffmanTable {
  bool defined = false;
  // Codes of up to kFastBits bits: (length << 8) | symbol, 0 where the code is longer.
  std::array<uint16_t, 1 << kFastBits> fast{};
  // Canonical decoding of longer codes: the largest code of each length (-1: none), the first
  // code of each length and where its symbols start.
  std::array<int32_t, 18> max_code{};
  std::array<int32_t, 17> first_code{};
  std::array<int32_t, 17> first_symbol{};
  std::array<uint8_t, 256> symbols{};
  // AC codes whose magnitude bits also fit in kFastBits: (value << 8) | (run << 4) | bits used,
  // so a whole coefficient is one lookup; 0 where they do not fit.
  std::array<int32_t, 1 << kFastBits> fast_ac{};
};

struct Component {
  uint8_t id = 0;
  uint32_t h = 1;
  uint32_t v = 1;
  uint32_t quant_index = 0;
  // Latched at the component's first scan: a later DQT may redefine the table for other frames.
  std::array<uint16_t, 64> quant{};
  bool quant_latched = false;
  uint32_t dc_table = 0;
  uint32_t ac_table = 0;
  // Blocks that hold image samples, and the blocks stored (whole MCUs).
  uint32_t blocks_wide = 0;
  uint32_t blocks_high = 0;
  uint32_t stored_wide = 0;
  uint32_t stored_high = 0;
  uint32_t index = 0;                  // its place in the frame, and its scratch buffers
  int16_t* coefficients = nullptr;     // 64 per stored block, natural order, not dequantized
  int32_t dc_prediction = 0;

  int16_t* Block(uint32_t row, uint32_t column) const { return &coefficients[(static_cast<size_t>(row) * stored_wide + column) * 64]; }
};

// Reads entropy-coded bits: 0xFF 0x00 is a data byte 0xFF, and a marker ends the data (zeros are
// fed after it, and after the input's end, so a damaged stream decodes garbage, never past the end).
class BitReader {
 public:
  BitReader(const uint8_t* data, size_t size, size_t position) : data_(data), size_(size), position_(position) {}

  uint32_t Peek(int count) {
    if (count_ < count) Fill();
    return static_cast<uint32_t>(bits_ >> (64 - count));
  }
  void Consume(int count) {
    bits_ <<= count;
    count_ -= count;
  }
  uint32_t Bits(int count) {
    if (count == 0) return 0;
    uint32_t value = Peek(count);
    Consume(count);
    return value;
  }
  bool Bit() { return Bits(1) != 0; }

  int DecodeSymbol(const HuffmanTable& table) {
    uint32_t peek = Peek(16);
    uint16_t entry = table.fast[peek >> (16 - kFastBits)];
    if (entry != 0) {
      Consume(entry >> 8);
      return entry & 0xFF;
    }
    for (int length = kFastBits + 1; length <= 16; ++length) {
      auto code = static_cast<int32_t>(peek >> (16 - length));
      if (code <= table.max_code[length]) {
        int32_t index = table.first_symbol[length] + code - table.first_code[length];
        if (index < 0 || index > 255) break;
        Consume(length);
        return table.symbols[index];
      }
    }
    Corrupt("bad Huffman code");
  }

  // A magnitude category's bits as a signed value (T.81 F.2.2.1 EXTEND).
  int32_t Extend(int category) {
    if (category == 0) return 0;
    if (category > 15) Corrupt("coefficient magnitude out of range");
    auto value = static_cast<int32_t>(Bits(category));
    if (value < (1 << (category - 1))) value += 1 - (1 << category);
    return value;
  }

  // At a restart interval's end: drop the partial byte and step over the RSTn marker.
  void Restart() {
    bits_ = 0;
    count_ = 0;
    fed_padding_ = 0;
    if (!at_marker_) {
      // Damaged data: look for the next restart marker.
      while (position_ + 1 < size_ && !(data_[position_] == 0xFF && data_[position_ + 1] >= 0xD0 && data_[position_ + 1] <= 0xD7)) ++position_;
      if (position_ + 1 >= size_) {
        position_ = size_;
        return;
      }
    }
    size_t marker = position_;
    while (marker < size_ && data_[marker] == 0xFF) ++marker;
    if (marker < size_ && data_[marker] >= 0xD0 && data_[marker] <= 0xD7) {
      position_ = marker + 1;
      at_marker_ = false;
    }
  }

  // The reader consumed bits past the end of the input (not just up to a marker).
  bool RanPastEnd() const { return ran_out_ && count_ < fed_padding_; }

  // Where the next marker starts once the scan's data is done.
  size_t MarkerPosition() const {
    size_t position = position_;
    while (position + 1 < size_ && !(data_[position] == 0xFF && data_[position + 1] != 0x00 && !(data_[position + 1] >= 0xD0 && data_[position + 1] <= 0xD7))) ++position;
    return position;
  }

 private:
  void Fill() {
    while (count_ <= 56) {
      uint64_t byte = 0;
      if (!at_marker_ && position_ < size_) {
        byte = data_[position_];
        if (byte == 0xFF) {
          uint8_t next = position_ + 1 < size_ ? data_[position_ + 1] : 0xD9;
          if (next == 0x00) {
            position_ += 2;
          } else {
            at_marker_ = true;
            byte = 0;
            fed_padding_ += 8;
          }
        } else {
          ++position_;
        }
      } else {
        if (position_ >= size_) ran_out_ = true;
        fed_padding_ += 8;
      }
      bits_ |= byte << (56 - count_);
      count_ += 8;
    }
  }

  const uint8_t* data_;
  size_t size_;
  size_t position_;
  uint64_t bits_ = 0;
  int count_ = 0;
  int fed_padding_ = 0;
  bool at_marker_ = false;
  bool ran_out_ = false;
};

class JpegDecoder {
 public:
  JpegDecoder(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  ImageSize Probe() {
    ReadMarkers(/*stop_at_frame=*/true);
    return {width_, height_, static_cast<uint32_t>(components_.size())};
  }

  ImageSize Decode(uint32_t channels, uint64_t max_pixels, const PixelAllocator& allocate, uint32_t min_width, uint32_t min_height) {
    max_pixels_ = max_pixels;
    ReadMarkers(/*stop_at_frame=*/false);
    if (!frame_seen_) Corrupt("no frame header (SOF) before the end of the data");
    if (scans_ == 0) Corrupt("no scan (SOS) in the data");
    // Reduced decoding: the largest of 1/2, 1/4, 1/8 that keeps the image at least the size asked.
    for (uint32_t size : {1u, 2u, 4u}) {
      uint32_t reduced_width = (width_ * size + 7) / 8;
      uint32_t reduced_height = (height_ * size + 7) / 8;
      if (min_width != 0 && reduced_width >= min_width && reduced_height >= min_height) {
        block_size_ = size;
        break;
      }
    }
    out_width_ = (width_ * block_size_ + 7) / 8;
    out_height_ = (height_ * block_size_ + 7) / 8;
    Output(channels, allocate(static_cast<size_t>(out_width_) * out_height_ * channels));
    return {out_width_, out_height_, channels};
  }

 private:
  uint8_t Byte(size_t at) const {
    if (at >= size_) Corrupt("data ends inside a marker segment (truncated?)");
    return data_[at];
  }
  uint32_t Word(size_t at) const { return (static_cast<uint32_t>(Byte(at)) << 8) | Byte(at + 1); }

  void ReadMarkers(bool stop_at_frame) {
    if (size_ < 4 || data_[0] != 0xFF || data_[1] != 0xD8) Corrupt("not a JPEG file (no SOI marker)");
    size_t position = 2;
    while (true) {
      if (position >= size_) {
        if (scans_ > 0) return;  // no EOI: accept what was decoded if the scans ran whole
        Corrupt("data ends before the image does (truncated?)");
      }
      if (data_[position] != 0xFF) {
        // Garbage between segments: skip to the next marker, as decoders customarily do.
        ++position;
        continue;
      }
      uint8_t marker = Byte(position + 1);
      if (marker == 0xFF) {
        ++position;  // fill byte
        continue;
      }
      position += 2;
      if (marker == 0xD9) return;  // EOI
      if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue;  // TEM, stray RSTn
      uint32_t length = Word(position);
      if (length < 2 || position + length > size_) Corrupt("a marker segment runs past the end of the data (truncated?)");
      const uint8_t* segment = data_ + position + 2;
      size_t segment_size = length - 2;
      size_t next = position + length;
      switch (marker) {
        case 0xC0:
        case 0xC1:
        case 0xC2:
          ReadFrame(segment, segment_size, marker == 0xC2);
          if (stop_at_frame) return;
          break;
        case 0xC3: Unsupported("lossless JPEG is not supported");
        case 0xC5: case 0xC6: case 0xC7: Unsupported("hierarchical JPEG is not supported");
        case 0xC9: case 0xCA: case 0xCB: case 0xCD: case 0xCE: case 0xCF: Unsupported("arithmetic-coded JPEG is not supported");
        case 0xC4: ReadHuffmanTables(segment, segment_size); break;
        case 0xDB: ReadQuantizationTables(segment, segment_size); break;
        case 0xDD:
          if (segment_size < 2) Corrupt("bad DRI segment");
          restart_interval_ = (static_cast<uint32_t>(segment[0]) << 8) | segment[1];
          break;
        case 0xEE: ReadAdobe(segment, segment_size); break;
        case 0xE0:
          if (segment_size >= 5 && std::memcmp(segment, "JFIF\0", 5) == 0) jfif_ = true;
          break;
        case 0xDA:
          if (stop_at_frame) Corrupt("a scan (SOS) before the frame header (SOF)");
          next = ReadScan(segment, segment_size, next);
          break;
        case 0xDC: break;  // DNL: heights come from the frame header here
        default: break;    // APPn, COM, JPG extensions: nothing the pixels need
      }
      position = next;
    }
  }

  void ReadFrame(const uint8_t* segment, size_t size, bool progressive) {
    if (frame_seen_) Corrupt("a second frame header");
    if (size < 6) Corrupt("bad SOF segment");
    if (segment[0] != 8) Unsupported(std::to_string(segment[0]) + "-bit samples are not supported (8-bit only)");
    height_ = (static_cast<uint32_t>(segment[1]) << 8) | segment[2];
    width_ = (static_cast<uint32_t>(segment[3]) << 8) | segment[4];
    uint32_t count = segment[5];
    if (width_ == 0) Corrupt("the frame's width is 0");
    if (height_ == 0) Unsupported("a height given by a DNL marker is not supported");
    if (count != 1 && count != 3 && count != 4) Unsupported(std::to_string(count) + " components are not supported (1, 3 or 4)");
    if (size < 6 + 3 * count) Corrupt("bad SOF segment");
    progressive_ = progressive;
    frame_seen_ = true;
    components_.resize(count);
    for (uint32_t index = 0; index < count; ++index) {
      Component& component = components_[index];
      component.index = index;
      component.id = segment[6 + 3 * index];
      component.h = segment[7 + 3 * index] >> 4;
      component.v = segment[7 + 3 * index] & 15;
      component.quant_index = segment[8 + 3 * index];
      if (component.h < 1 || component.h > 4 || component.v < 1 || component.v > 4) Corrupt("bad sampling factors");
      if (component.quant_index > 3) Corrupt("bad quantization table index");
      max_h_ = std::max(max_h_, component.h);
      max_v_ = std::max(max_v_, component.v);
    }
    for (Component& component : components_) {
      if (max_h_ % component.h != 0 || max_v_ % component.v != 0) Unsupported("sampling factors that do not divide the largest are not supported");
    }
    if (max_pixels_ != 0 && static_cast<uint64_t>(width_) * height_ > max_pixels_) {
      throw NativeError("ERR_IMAGE_TOO_LARGE", "JPEG: the image is " + std::to_string(width_) + "x" + std::to_string(height_) +
                                                    ", more than the limit of " + std::to_string(max_pixels_) + " pixels")
          .with("width", width_)
          .with("height", height_);
    }
    mcus_wide_ = (width_ + 8 * max_h_ - 1) / (8 * max_h_);
    mcus_high_ = (height_ + 8 * max_v_ - 1) / (8 * max_v_);
    if (max_pixels_ == 0) return;  // probing only
    for (Component& component : components_) {
      uint32_t samples_wide = (width_ * component.h + max_h_ - 1) / max_h_;
      uint32_t samples_high = (height_ * component.v + max_v_ - 1) / max_v_;
      component.blocks_wide = (samples_wide + 7) / 8;
      component.blocks_high = (samples_high + 7) / 8;
      component.stored_wide = mcus_wide_ * component.h;
      component.stored_high = mcus_high_ * component.v;
      std::vector<int16_t>& buffer = scratch.coefficients[component.index];
      buffer.assign(static_cast<size_t>(component.stored_wide) * component.stored_high * 64, 0);
      component.coefficients = buffer.data();
    }
  }

  void ReadHuffmanTables(const uint8_t* segment, size_t size) {
    size_t at = 0;
    while (at < size) {
      uint32_t kind = segment[at] >> 4;
      uint32_t index = segment[at] & 15;
      if (kind > 1 || index > 3) Corrupt("bad Huffman table class or index");
      if (at + 17 > size) Corrupt("bad DHT segment");
      std::array<uint8_t, 17> counts{};
      uint32_t total = 0;
      for (int length = 1; length <= 16; ++length) total += counts[length] = segment[at + length];
      if (total > 256 || at + 17 + total > size) Corrupt("bad DHT segment");
      HuffmanTable& table = (kind == 0 ? dc_tables_ : ac_tables_)[index];
      table = HuffmanTable{};
      std::memcpy(table.symbols.data(), segment + at + 17, total);
      int32_t code = 0;
      int32_t symbol = 0;
      for (int length = 1; length <= 16; ++length) {
        table.first_symbol[length] = symbol;
        table.first_code[length] = code;
        for (uint32_t n = 0; n < counts[length]; ++n, ++symbol, ++code) {
          if (code >= (1 << length)) Corrupt("bad Huffman table (more codes than its lengths allow)");
          if (length <= kFastBits) {
            uint32_t shift = kFastBits - length;
            for (uint32_t fill = 0; fill < (1u << shift); ++fill) {
              table.fast[(static_cast<uint32_t>(code) << shift) | fill] = static_cast<uint16_t>((length << 8) | table.symbols[symbol]);
            }
          }
        }
        table.max_code[length] = counts[length] != 0 ? code - 1 : -1;
        code <<= 1;
      }
      table.max_code[17] = 0x7FFFFFFF;
      table.defined = true;
      if (kind == 1) {
        for (uint32_t peek = 0; peek < (1u << kFastBits); ++peek) {
          uint16_t entry = table.fast[peek];
          if (entry == 0) continue;
          int length = entry >> 8;
          int run = (entry & 0xFF) >> 4;
          int category = entry & 15;
          if (category == 0 || length + category > kFastBits) continue;
          auto bits = static_cast<int32_t>((peek >> (kFastBits - length - category)) & ((1u << category) - 1));
          if (bits < (1 << (category - 1))) bits += 1 - (1 << category);
          table.fast_ac[peek] = static_cast<int32_t>(static_cast<uint32_t>(bits) << 8) | (run << 4) | (length + category);
        }
      }
      at += 17 + total;
    }
  }

  void ReadQuantizationTables(const uint8_t* segment, size_t size) {
    size_t at = 0;
    while (at < size) {
      uint32_t precision = segment[at] >> 4;
      uint32_t index = segment[at] & 15;
      if (precision > 1 || index > 3) Corrupt("bad quantization table");
      size_t bytes = precision == 0 ? 64 : 128;
      if (at + 1 + bytes > size) Corrupt("bad DQT segment");
      for (int k = 0; k < 64; ++k) {
        uint16_t value = precision == 0 ? segment[at + 1 + k] : static_cast<uint16_t>((segment[at + 1 + 2 * k] << 8) | segment[at + 2 + 2 * k]);
        quant_tables_[index][kZigzag[k]] = value;
      }
      quant_defined_[index] = true;
      at += 1 + bytes;
    }
  }

  void ReadAdobe(const uint8_t* segment, size_t size) {
    if (size >= 12 && std::memcmp(segment, "Adobe", 5) == 0) {
      adobe_ = true;
      adobe_transform_ = segment[11];
    }
  }

  // Decodes one scan; returns where the marker after its entropy-coded data starts.
  size_t ReadScan(const uint8_t* segment, size_t size, size_t data_start) {
    if (!frame_seen_) Corrupt("a scan (SOS) before the frame header (SOF)");
    if (size < 1) Corrupt("bad SOS segment");
    uint32_t count = segment[0];
    if (count < 1 || count > 4 || size < 4 + 2 * count) Corrupt("bad SOS segment");
    std::vector<Component*> scan;
    for (uint32_t n = 0; n < count; ++n) {
      uint8_t id = segment[1 + 2 * n];
      Component* found = nullptr;
      for (Component& component : components_) {
        if (component.id == id) found = &component;
      }
      if (found == nullptr) Corrupt("a scan names a component the frame does not have");
      found->dc_table = segment[2 + 2 * n] >> 4;
      found->ac_table = segment[2 + 2 * n] & 15;
      if (found->dc_table > 3 || found->ac_table > 3) Corrupt("bad Huffman table index in a scan");
      if (!found->quant_latched) {
        if (!quant_defined_[found->quant_index]) Corrupt("a component's quantization table is not defined");
        found->quant = quant_tables_[found->quant_index];
        found->quant_latched = true;
      }
      scan.push_back(found);
    }
    uint32_t spectral_start = segment[1 + 2 * count];
    uint32_t spectral_end = segment[2 + 2 * count];
    uint32_t high = segment[3 + 2 * count] >> 4;
    uint32_t low = segment[3 + 2 * count] & 15;
    if (progressive_) {
      if (spectral_start > 63 || spectral_end > 63 || spectral_start > spectral_end || low > 13) Corrupt("bad progressive scan parameters");
      if (spectral_start == 0 && spectral_end != 0) Corrupt("a progressive DC scan with AC coefficients");
      if (spectral_start != 0 && count != 1) Corrupt("a progressive AC scan of several components");
    } else {
      spectral_start = 0;
      spectral_end = 63;
      high = 0;
      low = 0;
    }
    for (Component* component : scan) {
      bool needs_dc = spectral_start == 0 && high == 0;
      if (needs_dc && !dc_tables_[component->dc_table].defined) Corrupt("a scan uses an undefined DC Huffman table");
      if (spectral_end > 0 && !ac_tables_[component->ac_table].defined) Corrupt("a scan uses an undefined AC Huffman table");
      component->dc_prediction = 0;
    }

    BitReader reader(data_, size_, data_start);
    uint32_t end_of_band_run = 0;
    auto decode_block = [&](Component& component, int16_t* block) {
      if (!progressive_) {
        DecodeSequential(reader, component, block);
      } else if (spectral_start == 0) {
        if (high == 0) {
          int category = reader.DecodeSymbol(dc_tables_[component.dc_table]);
          component.dc_prediction += reader.Extend(category);
          block[0] = static_cast<int16_t>(component.dc_prediction * (1 << low));
        } else if (reader.Bit()) {
          block[0] = static_cast<int16_t>(block[0] | (1 << low));
        }
      } else if (high == 0) {
        DecodeAcFirst(reader, component, block, spectral_start, spectral_end, low, end_of_band_run);
      } else {
        DecodeAcRefine(reader, component, block, spectral_start, spectral_end, low, end_of_band_run);
      }
    };
    auto restart = [&]() {
      reader.Restart();
      for (Component* component : scan) component->dc_prediction = 0;
      end_of_band_run = 0;
    };

    uint32_t restarts_left = restart_interval_;
    if (scan.size() == 1) {
      // A single-component scan codes the component's own blocks, not whole MCUs (A.2.2).
      Component& component = *scan[0];
      for (uint32_t row = 0; row < component.blocks_high; ++row) {
        for (uint32_t column = 0; column < component.blocks_wide; ++column) {
          if (restart_interval_ != 0 && restarts_left == 0) {
            restart();
            restarts_left = restart_interval_;
          }
          decode_block(component, component.Block(row, column));
          if (restart_interval_ != 0) --restarts_left;
        }
      }
    } else {
      for (uint32_t mcu_row = 0; mcu_row < mcus_high_; ++mcu_row) {
        for (uint32_t mcu_column = 0; mcu_column < mcus_wide_; ++mcu_column) {
          if (restart_interval_ != 0 && restarts_left == 0) {
            restart();
            restarts_left = restart_interval_;
          }
          for (Component* component : scan) {
            for (uint32_t y = 0; y < component->v; ++y) {
              for (uint32_t x = 0; x < component->h; ++x) {
                decode_block(*component, component->Block(mcu_row * component->v + y, mcu_column * component->h + x));
              }
            }
          }
          if (restart_interval_ != 0) --restarts_left;
        }
      }
    }
    if (reader.RanPastEnd()) Corrupt("data ends before the image does (truncated?)");
    ++scans_;
    return reader.MarkerPosition();
  }

  // A whole AC coefficient in one lookup where its code and bits fit (HuffmanTable::fast_ac): it
  // goes to zigzag position k after its run of zeros, scaled by 2^shift, and k steps past it.
  template <typename Index>
  static bool FastCoefficient(BitReader& reader, const HuffmanTable& ac, int16_t* block, Index& k, uint32_t shift) {
    int32_t fast = ac.fast_ac[reader.Peek(kFastBits)];
    if (fast == 0) return false;
    reader.Consume(fast & 15);
    k += static_cast<Index>((fast >> 4) & 15);
    if (k > 63) Corrupt("a block's coefficients run past 64");
    block[kZigzag[k]] = static_cast<int16_t>((fast >> 8) * (1 << shift));
    ++k;
    return true;
  }

  void DecodeSequential(BitReader& reader, Component& component, int16_t* block) {
    int category = reader.DecodeSymbol(dc_tables_[component.dc_table]);
    component.dc_prediction += reader.Extend(category);
    block[0] = static_cast<int16_t>(component.dc_prediction);
    const HuffmanTable& ac = ac_tables_[component.ac_table];
    for (int k = 1; k < 64;) {
      if (FastCoefficient(reader, ac, block, k, 0)) continue;
      int symbol = reader.DecodeSymbol(ac);
      int run = symbol >> 4;
      int size = symbol & 15;
      if (size == 0) {
        if (run != 15) break;  // end of block
        k += 16;
        continue;
      }
      k += run;
      if (k > 63) Corrupt("a block's coefficients run past 64");
      block[kZigzag[k]] = static_cast<int16_t>(reader.Extend(size));
      ++k;
    }
  }

  void DecodeAcFirst(BitReader& reader, Component& component, int16_t* block, uint32_t start, uint32_t end, uint32_t low, uint32_t& end_of_band_run) {
    if (end_of_band_run > 0) {
      --end_of_band_run;
      return;
    }
    const HuffmanTable& ac = ac_tables_[component.ac_table];
    for (uint32_t k = start; k <= end;) {
      // End-of-band runs are never in the one-lookup table, so it serves first scans as it is.
      if (FastCoefficient(reader, ac, block, k, low)) continue;
      int symbol = reader.DecodeSymbol(ac);
      int run = symbol >> 4;
      int size = symbol & 15;
      if (size == 0) {
        if (run < 15) {
          end_of_band_run = (1u << run) - 1 + reader.Bits(run);
          break;
        }
        k += 16;
        continue;
      }
      k += run;
      if (k > 63) Corrupt("a block's coefficients run past 64");
      block[kZigzag[k]] = static_cast<int16_t>(reader.Extend(size) * (1 << low));
      ++k;
    }
  }

  void DecodeAcRefine(BitReader& reader, Component& component, int16_t* block, uint32_t start, uint32_t end, uint32_t low, uint32_t& end_of_band_run) {
    const int positive = 1 << low;
    const int negative = -positive;
    auto refine = [&](int16_t& coefficient) {
      if (reader.Bit() && (coefficient & positive) == 0) coefficient = static_cast<int16_t>(coefficient + (coefficient >= 0 ? positive : negative));
    };
    uint32_t k = start;
    if (end_of_band_run == 0) {
      const HuffmanTable& ac = ac_tables_[component.ac_table];
      while (k <= end) {
        int symbol = reader.DecodeSymbol(ac);
        int run = symbol >> 4;
        int size = symbol & 15;
        int value = 0;
        if (size == 0) {
          if (run < 15) {
            end_of_band_run = (1u << run) + reader.Bits(run);
            break;
          }
        } else {
          if (size != 1) Corrupt("a refinement coefficient of more than one bit");
          value = reader.Bit() ? positive : negative;
        }
        // Skip `run` coefficients that are still zero, refining the non-zero ones passed on the way;
        // the new value lands on the next zero one.
        while (k <= end) {
          int16_t& coefficient = block[kZigzag[k]];
          if (coefficient != 0) {
            refine(coefficient);
          } else {
            if (run == 0) {
              if (value != 0) coefficient = static_cast<int16_t>(value);
              ++k;
              break;
            }
            --run;
          }
          ++k;
        }
      }
    }
    if (end_of_band_run > 0) {
      for (; k <= end; ++k) {
        int16_t& coefficient = block[kZigzag[k]];
        if (coefficient != 0) refine(coefficient);
      }
      --end_of_band_run;
    }
  }

  // Dequantizes and inverse-transforms every block of a component into a plane of samples.
  // How many times the output's block size a subsampled component is decoded at when decoding
  // reduced: its chroma then needs less upsampling, or none (libjpeg scales chroma up through the
  // IDCT the same way). 1 at full size, where 8 samples a block is the most there is.
  uint32_t ComponentMultiplier(const Component& component) const {
    uint32_t factor_x = max_h_ / component.h;
    uint32_t factor_y = max_v_ / component.v;
    uint32_t multiplier = 1;
    while (block_size_ * multiplier * 2 <= 8 && factor_x % (multiplier * 2) == 0 && factor_y % (multiplier * 2) == 0) multiplier *= 2;
    return multiplier;
  }

  Plane Samples(const Component& component) const {
    const uint32_t block = block_size_ * ComponentMultiplier(component);
    const uint32_t plane_width = component.stored_wide * block;
    std::vector<uint8_t>& plane = scratch.samples[component.index];
    plane.resize(static_cast<size_t>(plane_width) * component.stored_high * block);
    // The blocks outside the image's own (padding of the last MCUs) are never shown.
    for (uint32_t row = 0; row < component.blocks_high; ++row) {
      for (uint32_t column = 0; column < component.blocks_wide; ++column) {
        uint8_t* target = &plane[(static_cast<size_t>(row) * block * plane_width) + column * block];
        if (block == 8) InverseTransform(component.Block(row, column), component.quant.data(), target, plane_width);
        else ReducedInverseTransform(component.Block(row, column), component.quant.data(), target, plane_width, block);
      }
    }
    return {plane.data(), plane_width};
  }

  // The 8x8 inverse DCT as two matrix products in floats, written over rows of eight (GCC and
  // Clang vectors) and cut to the rows and columns that hold coefficients: a photograph's blocks
  // keep a few low frequencies, and a block with none but DC is its DC value everywhere.
  using Row8 = float __attribute__((vector_size(32)));
  using Ints8 = int32_t __attribute__((vector_size(32)));

  static void InverseTransform(const int16_t* block, const uint16_t* quant, uint8_t* out, uint32_t stride) {
    struct Basis {
      Row8 by_sample[8];     // by_sample[y][v] = C(v)/2 cos((2y + 1) v pi / 16)
      Row8 by_frequency[8];  // by_frequency[u][x], the same numbers transposed
    };
    static const Basis basis = [] {
      Basis made{};
      for (int x = 0; x < 8; ++x) {
        for (int u = 0; u < 8; ++u) {
          double scale = u == 0 ? std::sqrt(0.125) : 0.5;
          auto value = static_cast<float>(scale * std::cos((2 * x + 1) * u * M_PI / 16.0));
          made.by_sample[x][u] = value;
          made.by_frequency[u][x] = value;
        }
      }
      return made;
    }();
    // Rows (vertical frequencies) and columns (horizontal ones) up to the last non-zero
    // coefficient, found four coefficients at a time: a row is two 64-bit words.
    uint64_t words[16];
    std::memcpy(words, block, sizeof(words));
    int rows = 0;
    uint64_t left = 0;   // columns 0-3 of every row, ORed
    uint64_t right = 0;  // columns 4-7
    for (int v = 0; v < 8; ++v) {
      if ((words[2 * v] | words[2 * v + 1]) != 0) rows = v + 1;
      left |= words[2 * v];
      right |= words[2 * v + 1];
    }
    // The highest non-zero 16-bit lane of a word (little-endian: lane i is bits 16i..16i+15).
    auto last_lane = [](uint64_t word) { return word == 0 ? 0 : (63 - __builtin_clzll(word)) / 16 + 1; };
    int columns_used = right != 0 ? 4 + last_lane(right) : last_lane(left);
    if (rows <= 1 && columns_used <= 1) {
      // F(0,0) C(0)^2 / 4 = F(0,0) / 8 at every sample.
      int value = static_cast<int>(static_cast<float>(block[0]) * quant[0] * 0.125f + 128.5f);
      auto sample = static_cast<uint8_t>(std::clamp(value, 0, 255));
      for (int y = 0; y < 8; ++y) std::memset(out + static_cast<size_t>(y) * stride, sample, 8);
      return;
    }
    Row8 coefficients[8];
    for (int v = 0; v < rows; ++v) {
      for (int u = 0; u < 8; ++u) coefficients[v][u] = static_cast<float>(block[v * 8 + u]) * quant[v * 8 + u];
    }
    // Vertical: columns[y] = sum over v of basis[y][v] * F[v].
    Row8 columns[8];
    for (int y = 0; y < 8; ++y) {
      Row8 sum = coefficients[0] * basis.by_sample[y][0];
      for (int v = 1; v < rows; ++v) sum += coefficients[v] * basis.by_sample[y][v];
      columns[y] = sum;
    }
    // Horizontal: samples[y] = sum over u of columns[y][u] * basis[.][u].
    for (int y = 0; y < 8; ++y) {
      Row8 sum = basis.by_frequency[0] * columns[y][0];
      for (int u = 1; u < columns_used; ++u) sum += basis.by_frequency[u] * columns[y][u];
      // Truncation rounds here: anything below zero is clamped to 0 anyway.
      Ints8 values = __builtin_convertvector(sum + 128.5f, Ints8);
      values = values < 0 ? 0 : values;
      values = values > 255 ? 255 : values;
      uint8_t* target = out + static_cast<size_t>(y) * stride;
      for (int x = 0; x < 8; ++x) target[x] = static_cast<uint8_t>(values[x]);
    }
  }

  // The inverse DCT to `size` (4, 2 or 1) samples a side from the block's lowest size x size
  // frequencies: an orthonormal size-point transform of them, scaled by sqrt(size / 8) per axis so
  // each sample is the mean of the 8 / size pixels it stands for (Pillow's draft mode, libjpeg's
  // scaled decoding).
  static void ReducedInverseTransform(const int16_t* block, const uint16_t* quant, uint8_t* out, uint32_t stride, uint32_t size) {
    static const auto bases = [] {
      std::array<std::array<float, 16>, 5> made{};  // made[size][n * size + u]
      for (int points : {1, 2, 4}) {
        for (int n = 0; n < points; ++n) {
          for (int u = 0; u < points; ++u) {
            double normal = u == 0 ? std::sqrt(1.0 / points) : std::sqrt(2.0 / points);
            made[points][n * points + u] = static_cast<float>(normal * std::sqrt(points / 8.0) * std::cos((2 * n + 1) * u * M_PI / (2.0 * points)));
          }
        }
      }
      return made;
    }();
    const float* basis = bases[size].data();
    float columns[16];
    for (uint32_t y = 0; y < size; ++y) {
      for (uint32_t u = 0; u < size; ++u) {
        float sum = 0;
        for (uint32_t v = 0; v < size; ++v) sum += basis[y * size + v] * static_cast<float>(block[v * 8 + u]) * quant[v * 8 + u];
        columns[y * size + u] = sum;
      }
    }
    for (uint32_t y = 0; y < size; ++y) {
      for (uint32_t x = 0; x < size; ++x) {
        float sum = 0;
        for (uint32_t u = 0; u < size; ++u) sum += basis[x * size + u] * columns[y * size + u];
        out[static_cast<size_t>(y) * stride + x] = static_cast<uint8_t>(std::clamp(static_cast<int>(sum + 128.5f), 0, 255));
      }
    }
  }

  // A component's plane brought up to the image's full size. Halved chroma (4:2:0, 4:2:2, 4:4:0)
  // is interpolated with a triangle filter (3/4 of the sample an output lies in, 1/4 of its nearer
  // neighbour, per halved axis); other factors are replicated.
  Plane FullSize(const Component& component) const {
    const Plane samples = Samples(component);
    const uint32_t multiplier = ComponentMultiplier(component);
    uint32_t scale_x = max_h_ / component.h / multiplier;
    uint32_t scale_y = max_v_ / component.v / multiplier;
    if (scale_x == 1 && scale_y == 1) return samples;
    const uint8_t* plane = samples.data;
    const size_t plane_width = samples.stride;
    std::vector<uint8_t>& out = scratch.full[component.index];
    out.resize(static_cast<size_t>(out_width_) * out_height_);
    const uint32_t source_width = (out_width_ + scale_x - 1) / scale_x;
    const uint32_t source_height = (out_height_ + scale_y - 1) / scale_y;
    const bool smooth = (scale_x == 1 || scale_x == 2) && (scale_y == 1 || scale_y == 2);
    auto row_of = [&](int64_t y) { return plane + static_cast<size_t>(std::clamp<int64_t>(y, 0, source_height - 1)) * plane_width; };
    std::vector<int> sums(source_width + 2);
    for (uint32_t y = 0; y < out_height_; ++y) {
      uint8_t* target = &out[static_cast<size_t>(y) * out_width_];
      int64_t source_y = y / scale_y;
      const uint8_t* row = row_of(source_y);
      if (!smooth) {
        for (uint32_t x = 0; x < out_width_; ++x) target[x] = row[x / scale_x];
        continue;
      }
      // Vertical blend in units of 1/4, edge samples repeated at both ends.
      const uint8_t* near = scale_y == 2 ? row_of(y % 2 == 0 ? source_y - 1 : source_y + 1) : row;
      for (uint32_t x = 0; x < source_width; ++x) sums[x + 1] = 3 * row[x] + near[x];
      sums[0] = sums[1];
      sums[source_width + 1] = sums[source_width];
      if (scale_x == 1) {
        for (uint32_t x = 0; x < out_width_; ++x) target[x] = static_cast<uint8_t>((sums[x + 1] + 2) >> 2);
        continue;
      }
      // Rounding biases alternate between the two outputs of a sample so that errors do not pile up one way.
      const int even_bias = scale_y == 2 ? 8 : 4;
      const int odd_bias = scale_y == 2 ? 7 : 8;
      for (uint32_t x = 0; x < source_width; ++x) {
        int here = 3 * sums[x + 1];
        uint32_t left = 2 * x;
        target[left] = static_cast<uint8_t>((here + sums[x] + even_bias) >> 4);
        if (left + 1 < out_width_) target[left + 1] = static_cast<uint8_t>((here + sums[x + 2] + odd_bias) >> 4);
      }
    }
    return {out.data(), out_width_};
  }

  // Writes the image as `channels` interleaved 8-bit channels (width x height x channels bytes).
  void Output(uint32_t channels, uint8_t* out) const {
    // Colour transform: JFIF files and 3-component files without an Adobe marker are YCbCr unless
    // their components are named R, G, B; Adobe's marker says so itself.
    bool transform = true;
    if (components_.size() == 3) {
      if (adobe_) transform = adobe_transform_ != 0;
      else if (!jfif_ && components_[0].id == 'R' && components_[1].id == 'G' && components_[2].id == 'B') transform = false;
    } else if (components_.size() == 4) {
      transform = adobe_ && adobe_transform_ == 2;  // YCCK; else plain CMYK
    }
    auto store = [channels](uint8_t* pixel, int r, int g, int b) {
      if (channels == 1) {
        *pixel = static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16);
        return;
      }
      pixel[0] = static_cast<uint8_t>(r);
      pixel[1] = static_cast<uint8_t>(g);
      pixel[2] = static_cast<uint8_t>(b);
      if (channels == 4) pixel[3] = 255;
    };
    if (components_.size() == 1 || (components_.size() == 3 && transform && channels == 1)) {
      // Gray, or a YCbCr image asked for in gray: its luma plane as it is.
      const Plane gray = FullSize(components_[0]);
      for (uint32_t y = 0; y < out_height_; ++y) {
        const uint8_t* row = gray.data + y * gray.stride;
        uint8_t* target = out + static_cast<size_t>(y) * out_width_ * channels;
        if (channels == 1) {
          std::memcpy(target, row, out_width_);
          continue;
        }
        for (uint32_t x = 0; x < out_width_; ++x) store(target + x * channels, row[x], row[x], row[x]);
      }
      return;
    }
    std::array<Plane, 4> planes{};
    for (const Component& component : components_) planes[component.index] = FullSize(component);
    // JFIF's YCbCr to RGB in 16.16 fixed point, one table per term.
    static const auto tables = [] {
      std::array<std::array<int32_t, 256>, 4> made{};
      for (int value = 0; value < 256; ++value) {
        int centered = value - 128;
        made[0][value] = (91881 * centered + 32768) >> 16;   // Cr's part of R
        made[1][value] = (116130 * centered + 32768) >> 16;  // Cb's part of B
        made[2][value] = 22554 * centered;                   // Cb's part of G (unshifted)
        made[3][value] = 46802 * centered - 32768;           // Cr's part of G (unshifted, rounding)
      }
      return made;
    }();
    const bool inked = components_.size() == 4;
    for (uint32_t y = 0; y < out_height_; ++y) {
      const uint8_t* first = planes[0].data + y * planes[0].stride;
      const uint8_t* second = planes[1].data + y * planes[1].stride;
      const uint8_t* third = planes[2].data + y * planes[2].stride;
      const uint8_t* black = inked ? planes[3].data + y * planes[3].stride : nullptr;
      uint8_t* target = out + static_cast<size_t>(y) * out_width_ * channels;
      if (transform && !inked && channels == 3) {
        // The common case on its own: YCbCr to RGB.
        for (uint32_t x = 0; x < out_width_; ++x) {
          int luma = first[x];
          int cb = second[x];
          int cr = third[x];
          target[3 * x] = static_cast<uint8_t>(std::clamp(luma + tables[0][cr], 0, 255));
          target[3 * x + 1] = static_cast<uint8_t>(std::clamp(luma - ((tables[2][cb] + tables[3][cr]) >> 16), 0, 255));
          target[3 * x + 2] = static_cast<uint8_t>(std::clamp(luma + tables[1][cb], 0, 255));
        }
        continue;
      }
      for (uint32_t x = 0; x < out_width_; ++x) {
        int r = first[x];
        int g = second[x];
        int b = third[x];
        if (transform) {
          int luma = r;
          int cb = g;
          int cr = b;
          r = std::clamp(luma + tables[0][cr], 0, 255);
          g = std::clamp(luma - ((tables[2][cb] + tables[3][cr]) >> 16), 0, 255);
          b = std::clamp(luma + tables[1][cb], 0, 255);
        }
        if (inked) {
          // Adobe writes CMYK inverted, so each stored value is already 255 - ink: scale by K's.
          int k = black[x];
          r = (r * k + 127) / 255;
          g = (g * k + 127) / 255;
          b = (b * k + 127) / 255;
        }
        store(target + x * channels, r, g, b);
      }
    }
  }

  const uint8_t* data_;
  size_t size_;
  uint64_t max_pixels_ = 0;
  bool frame_seen_ = false;
  bool progressive_ = false;
  bool jfif_ = false;
  bool adobe_ = false;
  uint8_t adobe_transform_ = 1;
  uint32_t width_ = 0;
  uint32_t height_ = 0;
  // Samples per block side in the output: 8, or 4, 2, 1 when decoding reduced.
  uint32_t block_size_ = 8;
  uint32_t out_width_ = 0;
  uint32_t out_height_ = 0;
  uint32_t max_h_ = 1;
  uint32_t max_v_ = 1;
  uint32_t mcus_wide_ = 0;
  uint32_t mcus_high_ = 0;
  uint32_t restart_interval_ = 0;
  uint32_t scans_ = 0;
  std::vector<Component> components_;
  std::array<HuffmanTable, 4> dc_tables_{};
  std::array<HuffmanTable, 4> ac_tables_{};
  std::array<std::array<uint16_t, 64>, 4> quant_tables_{};
  std::array<bool, 4> quant_defined_{};
};

}  // namespace

ImageSize ProbeJpeg(const uint8_t* data, size_t size) { return JpegDecoder(data, size).Probe(); }

ImageSize DecodeJpegInto(const uint8_t* data, size_t size, uint32_t channels, uint64_t max_pixels, const PixelAllocator& allocate, uint32_t min_width,
                         uint32_t min_height) {
  if (channels != 1 && channels != 3 && channels != 4) throw NativeError("ERR_INVALID_ARGUMENT", "channels must be 1, 3 or 4");
  if (max_pixels == 0) max_pixels = UINT64_MAX;
  struct Release {
    ~Release() {
      for (auto& buffer : scratch.coefficients) ReleaseIfLarge(buffer);
      for (auto& buffer : scratch.samples) ReleaseIfLarge(buffer);
      for (auto& buffer : scratch.full) ReleaseIfLarge(buffer);
    }
  } release;
  return JpegDecoder(data, size).Decode(channels, max_pixels, allocate, min_width, min_height);
}

DecodedImage DecodeJpeg(const uint8_t* data, size_t size, uint32_t channels, uint64_t max_pixels) {
  DecodedImage image;
  ImageSize decoded = DecodeJpegInto(data, size, channels, max_pixels, [&](size_t bytes) {
    image.pixels.resize(bytes);
    return image.pixels.data();
  });
  image.width = decoded.width;
  image.height = decoded.height;
  image.channels = decoded.channels;
  return image;
}


}  // namespace trellis::image
