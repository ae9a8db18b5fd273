// libFuzzer target for the SSD tier's KV segment files (memory/src/segment_file.cpp over
// memory/src/file_io.cpp): arbitrary bytes are opened as a segment (a memfd, so the reader does
// real open/pread calls) and, when that verifies, every block is read back. Random bytes rarely
// carry valid XXH3 checksums, so each input is also tried "repaired": the footer hash, the file
// size and the block checksums recomputed wherever the header lets them be placed, which lets
// the fuzzer reach the layout checks and the block reads. Beyond "no crash, no leak" it checks:
// only CorruptSegment escapes an open; an open segment reports exactly the header and table its
// bytes hold; a different expected fingerprint is refused; read_blocks returns the file's bytes,
// in any order, aligned or not, and throws CorruptSegment exactly when a requested block's
// checksum does not match; progress reaches the total. Run by scripts/fuzz.
#include <algorithm>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "den/memory/file_io.h"
#include "den/memory/segment_file.h"
#include "fuzz_support.h"

namespace {

using den::memory::AlignedBuffer;
using den::memory::block_checksum;
using den::memory::CorruptSegment;
using den::memory::SegmentEntry;
using den::memory::SegmentHeader;
using den::memory::SegmentReader;
namespace kernels = den::kernels;

constexpr int64_t kPage = den::memory::kDirectIoAlignment;
// Field offsets of the on-disk format (segment_file.h describes it, segment_file.cpp defines
// them): the harness reads them itself so that it can check the reader against the bytes.
constexpr int64_t kOffFingerprint = 16, kOffSessionId = 24, kOffGeneration = 32, kOffLayers = 40;
constexpr int64_t kOffDtype = 56, kOffBlockCount = 64, kOffBlockStride = 72, kOffPayloadOffset = 80;
constexpr int64_t kOffBlockBytes = 88, kHeaderBytes = 96, kEntryBytes = 24;
constexpr int64_t kOffFooterHash = 8, kOffFooterFileBytes = 16;

void require(bool condition, const char* what) { den::fuzz::require(condition, "segment_reader_fuzz", what); }

uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}
uint32_t get_u32(const uint8_t* p) { return static_cast<uint32_t>(get_u64(p) & 0xffffffffu); }
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// What the header of `bytes` claims; zeros where the input is too short.
struct Claims {
  SegmentHeader header;
  int64_t n_blocks = 0, stride = 0, payload_offset = 0, block_bytes = 0;
};

Claims read_claims(const std::vector<uint8_t>& bytes) {
  Claims c;
  if (bytes.size() < static_cast<size_t>(kHeaderBytes) + 8) return c;
  const uint8_t* h = bytes.data();
  c.header.model_fingerprint = get_u64(h + kOffFingerprint);
  c.header.session_id = get_u64(h + kOffSessionId);
  c.header.generation = get_u64(h + kOffGeneration);
  c.header.layout.n_layers = static_cast<int32_t>(get_u32(h + kOffLayers));
  c.header.layout.n_kv_heads = static_cast<int32_t>(get_u32(h + kOffLayers + 4));
  c.header.layout.head_dim = static_cast<int32_t>(get_u32(h + kOffLayers + 8));
  c.header.layout.block_tokens = static_cast<int32_t>(get_u32(h + kOffLayers + 12));
  const uint32_t dtype = get_u32(h + kOffDtype);
  if (dtype <= static_cast<uint32_t>(kernels::DType::bf16)) c.header.layout.dtype = static_cast<kernels::DType>(dtype);
  c.n_blocks = static_cast<int64_t>(get_u64(h + kOffBlockCount));
  c.stride = static_cast<int64_t>(get_u64(h + kOffBlockStride));
  c.payload_offset = static_cast<int64_t>(get_u64(h + kOffPayloadOffset));
  c.block_bytes = static_cast<int64_t>(get_u64(h + kOffBlockBytes));
  return c;
}

// Rewrites the checksums and the footer's size where the header says they belong, as far as
// they fit in the input. Returns false when nothing could be placed.
bool repair(std::vector<uint8_t>& bytes) {
  const auto size = static_cast<int64_t>(bytes.size());
  if (size < 2 * kPage || size % kPage != 0) return false;
  const Claims c = read_claims(bytes);
  const int64_t footer = size - kPage;
  if (c.payload_offset < kHeaderBytes || c.payload_offset > footer) return false;
  if (c.stride > 0 && c.block_bytes >= 0 && c.block_bytes <= c.stride && c.n_blocks > 0) {
    const int64_t table_blocks = std::min(c.n_blocks, (c.payload_offset - kHeaderBytes) / kEntryBytes);
    for (int64_t i = 0; i < table_blocks; ++i) {
      if (i > (footer - c.payload_offset) / c.stride) break;
      const int64_t at = c.payload_offset + i * c.stride;
      if (c.block_bytes > footer - at) break;
      put_u64(bytes.data() + kHeaderBytes + i * kEntryBytes + 16, block_checksum(bytes.data() + at, c.block_bytes));
    }
  }
  std::memcpy(bytes.data() + footer, "DENKVEND", 8);
  put_u64(bytes.data() + footer + kOffFooterHash, block_checksum(bytes.data(), c.payload_offset));
  put_u64(bytes.data() + footer + kOffFooterFileBytes, static_cast<uint64_t>(size));
  return true;
}

// Reads `indices` into `destinations` and checks the outcome against the file's bytes.
void check_read(const SegmentReader& reader, const Claims& c, const std::vector<uint8_t>& bytes,
                const std::vector<int32_t>& indices, const std::vector<void*>& destinations) {
  bool any_corrupt = false;
  for (int32_t index : indices) {
    const uint8_t* block = bytes.data() + c.payload_offset + index * c.stride;
    any_corrupt |= block_checksum(block, c.block_bytes) != reader.entries()[static_cast<size_t>(index)].checksum;
  }
  int64_t last_done = 0, last_total = -1;
  const den::memory::IoProgress progress = [&](int64_t done, int64_t total) {
    require(done > last_done && done <= total && (last_total < 0 || total == last_total), "progress went wrong");
    last_done = done;
    last_total = total;
  };
  try {
    reader.read_blocks(indices, destinations, progress);
  } catch (const CorruptSegment&) {
    require(any_corrupt, "read_blocks refused blocks whose checksums match");
    return;
  }
  require(!any_corrupt, "read_blocks returned a block whose checksum does not match");
  require(indices.empty() || last_done == static_cast<int64_t>(indices.size()) * c.block_bytes,
          "progress did not reach the total");
  for (size_t k = 0; k < indices.size(); ++k) {
    const uint8_t* block = bytes.data() + c.payload_offset + indices[k] * c.stride;
    require(std::memcmp(destinations[k], block, static_cast<size_t>(c.block_bytes)) == 0,
            "read_blocks returned other bytes than the file holds");
  }
}

void check_open_segment(const SegmentReader& reader, const std::vector<uint8_t>& bytes, const std::string& path) {
  const Claims c = read_claims(bytes);
  const SegmentHeader& h = reader.header();
  require(h.model_fingerprint == c.header.model_fingerprint && h.session_id == c.header.session_id &&
              h.generation == c.header.generation && h.layout == c.header.layout,
          "the reader reports another header than the file holds");
  require(c.block_bytes == h.layout.block_bytes() && c.stride >= c.block_bytes && c.stride % kPage == 0,
          "an open segment has an inconsistent block size or stride");
  require(static_cast<int64_t>(reader.entries().size()) == c.n_blocks, "the reader reports another block count");
  require(c.payload_offset + c.n_blocks * c.stride + kPage == static_cast<int64_t>(bytes.size()),
          "an open segment's sections do not fill the file");
  for (int64_t i = 0; i < c.n_blocks; ++i) {
    const uint8_t* e = bytes.data() + kHeaderBytes + i * kEntryBytes;
    const SegmentEntry& entry = reader.entries()[static_cast<size_t>(i)];
    require(entry.content_hash == get_u64(e) && entry.tokens == static_cast<int32_t>(get_u32(e + 8)) &&
                entry.checksum == get_u64(e + 16),
            "an entry differs from the table bytes");
    require(entry.tokens >= 0 && entry.tokens <= h.layout.block_tokens, "an entry holds an impossible token count");
  }

  // Every block in order into one aligned buffer (straight reads where stride == block_bytes),
  // then in reverse, one block twice, each one byte off alignment (the bounce buffer).
  const auto n = static_cast<int32_t>(c.n_blocks);
  AlignedBuffer aligned(std::max<int64_t>(1, c.n_blocks * c.block_bytes));
  std::vector<int32_t> indices;
  std::vector<void*> destinations;
  for (int32_t i = 0; i < n; ++i) {
    indices.push_back(i);
    destinations.push_back(static_cast<uint8_t*>(aligned.data()) + i * c.block_bytes);
  }
  check_read(reader, c, bytes, indices, destinations);

  std::vector<std::vector<uint8_t>> unaligned;
  indices.clear();
  destinations.clear();
  for (int32_t i = n - 1; i >= 0; --i) indices.push_back(i);
  if (n > 0) indices.push_back(0);
  for (size_t k = 0; k < indices.size(); ++k) {
    unaligned.emplace_back(static_cast<size_t>(c.block_bytes) + 1);
    destinations.push_back(unaligned.back().data() + 1);
  }
  check_read(reader, c, bytes, indices, destinations);

  // A reader expecting another model must refuse the same bytes.
  SegmentHeader other = h;
  other.model_fingerprint ^= 1;
  bool refused = false;
  try {
    SegmentReader mismatch(path, other, 0);
  } catch (const CorruptSegment&) {
    refused = true;
  }
  require(refused, "a segment of another model fingerprint opened");
}

void open_and_read(den::fuzz::MemoryFile& file, const std::vector<uint8_t>& bytes) {
  file.assign(bytes.data(), bytes.size());
  const Claims c = read_claims(bytes);
  std::optional<SegmentReader> reader;
  try {
    reader.emplace(file.path(), c.header, 0);
  } catch (const CorruptSegment&) {
    return;  // does not verify: the expected outcome for most inputs
  }
  check_open_segment(*reader, bytes, file.path());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static den::fuzz::MemoryFile file;
  const std::vector<uint8_t> input(data, data + size);
  std::vector<uint8_t> repaired = input;
  try {
    open_and_read(file, input);
    if (repair(repaired) && repaired != input) open_and_read(file, repaired);
  } catch (const std::exception& e) {
    // IoError included: a verified segment is never read past its end.
    std::fprintf(stderr, "segment_reader_fuzz: unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
