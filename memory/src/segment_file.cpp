// KV segment files: write_segment (tmp -> fsync -> rename -> fsync dir, in large aligned chunks)
// and SegmentReader (verified open, coalesced O_DIRECT block reads with per-block checksums).
// The session manager's checkpoint and restore paths use them; the layout is in segment_file.h.
#include "den/memory/segment_file.h"

#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace den::memory {
namespace {

constexpr int64_t kPage = kDirectIoAlignment;
constexpr uint32_t kVersion = 1;
constexpr std::string_view kMagic = "DENKVSEG";
constexpr std::string_view kFooterMagic = "DENKVEND";
// Writes and reads go through buffers of at most this size: large enough to run at disk speed,
// small enough to report progress often.
constexpr int64_t kChunkBytes = int64_t{8} << 20;

// Header field offsets. Every field is written explicitly, little endian, so the format does
// not depend on struct padding or the host's byte order.
constexpr int64_t kOffMagic = 0;            // 8 bytes "DENKVSEG"
constexpr int64_t kOffVersion = 8;          // u32
constexpr int64_t kOffFingerprint = 16;     // u64 (12..16 reserved, zero)
constexpr int64_t kOffSessionId = 24;       // u64
constexpr int64_t kOffGeneration = 32;      // u64
constexpr int64_t kOffLayers = 40;          // i32
constexpr int64_t kOffKvHeads = 44;         // i32
constexpr int64_t kOffHeadDim = 48;         // i32
constexpr int64_t kOffBlockTokens = 52;     // i32
constexpr int64_t kOffDtype = 56;           // u32 (60..64 reserved, zero)
constexpr int64_t kOffBlockCount = 64;      // i64
constexpr int64_t kOffBlockStride = 72;     // i64
constexpr int64_t kOffPayloadOffset = 80;   // i64
constexpr int64_t kOffBlockBytes = 88;      // i64
constexpr int64_t kHeaderBytes = 96;
// Table entry: u64 content hash, i32 tokens, u32 reserved (zero), u64 checksum.
constexpr int64_t kEntryBytes = 24;
// Footer page: 8 bytes "DENKVEND", u64 XXH3-64 of [0, payload_offset), i64 file size.
constexpr int64_t kOffFooterHash = 8;
constexpr int64_t kOffFooterFileBytes = 16;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{p[i]} << (8 * i);
  return v;
}
void put_i64(unsigned char* p, int64_t v) { put_u64(p, static_cast<uint64_t>(v)); }
void put_i32(unsigned char* p, int32_t v) { put_u32(p, static_cast<uint32_t>(v)); }
int64_t get_i64(const unsigned char* p) { return static_cast<int64_t>(get_u64(p)); }
int32_t get_i32(const unsigned char* p) { return static_cast<int32_t>(get_u32(p)); }

// Where everything lies in a segment of `n_blocks` blocks of `block_bytes`.
struct Geometry {
  int64_t block_bytes = 0;
  int64_t stride = 0;
  int64_t payload_offset = 0;
  int64_t footer_offset = 0;
  int64_t file_bytes = 0;
};

Geometry geometry_of(int64_t block_bytes, int64_t n_blocks) {
  Geometry g;
  g.block_bytes = block_bytes;
  g.stride = round_up(block_bytes, kPage);
  g.payload_offset = round_up(kHeaderBytes + n_blocks * kEntryBytes, kPage);
  g.footer_offset = g.payload_offset + n_blocks * g.stride;
  g.file_bytes = g.footer_offset + kPage;
  return g;
}

std::string hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%016llx", static_cast<unsigned long long>(v));
  return text;
}

std::string describe(const kernels::KvLayout& l) {
  return std::to_string(l.n_layers) + " layers x " + std::to_string(l.n_kv_heads) + " kv heads x head_dim " +
         std::to_string(l.head_dim) + ", " + std::to_string(l.block_tokens) + " tokens/block, " +
         std::string(kernels::dtype_name(l.dtype));
}

// Also bounds the block size (computed in double, which cannot overflow) so that a damaged
// header cannot make block_bytes() overflow int64.
bool layout_is_valid(const kernels::KvLayout& l, uint32_t dtype) {
  if (l.n_layers <= 0 || l.n_kv_heads <= 0 || l.head_dim <= 0 || l.block_tokens <= 0 ||
      dtype > static_cast<uint32_t>(kernels::DType::bf16)) {
    return false;
  }
  const double block_bytes = 2.0 * 4.0 * l.n_layers * l.n_kv_heads * l.head_dim * l.block_tokens;
  return block_bytes <= static_cast<double>(int64_t{1} << 40);
}

// Header, table and their zero padding: the first payload_offset bytes of the file.
void encode_prefix(unsigned char* p, const SegmentHeader& header, const std::vector<SegmentEntry>& entries,
                   const Geometry& g) {
  std::memcpy(p + kOffMagic, kMagic.data(), kMagic.size());
  put_u32(p + kOffVersion, kVersion);
  put_u64(p + kOffFingerprint, header.model_fingerprint);
  put_u64(p + kOffSessionId, header.session_id);
  put_u64(p + kOffGeneration, header.generation);
  put_i32(p + kOffLayers, header.layout.n_layers);
  put_i32(p + kOffKvHeads, header.layout.n_kv_heads);
  put_i32(p + kOffHeadDim, header.layout.head_dim);
  put_i32(p + kOffBlockTokens, header.layout.block_tokens);
  put_u32(p + kOffDtype, static_cast<uint32_t>(header.layout.dtype));
  put_i64(p + kOffBlockCount, static_cast<int64_t>(entries.size()));
  put_i64(p + kOffBlockStride, g.stride);
  put_i64(p + kOffPayloadOffset, g.payload_offset);
  put_i64(p + kOffBlockBytes, g.block_bytes);
  unsigned char* e = p + kHeaderBytes;
  for (const SegmentEntry& entry : entries) {
    put_u64(e, entry.content_hash);
    put_i32(e + 8, entry.tokens);
    put_u64(e + 16, entry.checksum);
    e += kEntryBytes;
  }
}

// Appends a byte stream to a file through one aligned buffer, one pwrite per full buffer.
// Every section of a segment is a whole number of pages, so each write stays O_DIRECT-aligned.
class ChunkWriter {
 public:
  ChunkWriter(File& file, int64_t total_bytes, const IoProgress& progress)
      : file_(file), buffer_(std::min(kChunkBytes, total_bytes)), total_bytes_(total_bytes), progress_(progress) {}

  void append(const void* bytes, int64_t n) {
    const auto* p = static_cast<const unsigned char*>(bytes);
    while (n > 0) {
      const int64_t take = std::min(n, buffer_.size() - used_);
      std::memcpy(static_cast<unsigned char*>(buffer_.data()) + used_, p, static_cast<size_t>(take));
      used_ += take;
      p += take;
      n -= take;
      if (used_ == buffer_.size()) flush();
    }
  }

  // Zeros rather than whatever the previous chunk left, so padding is deterministic.
  void append_zeros(int64_t n) {
    while (n > 0) {
      const int64_t take = std::min(n, buffer_.size() - used_);
      std::memset(static_cast<unsigned char*>(buffer_.data()) + used_, 0, static_cast<size_t>(take));
      used_ += take;
      n -= take;
      if (used_ == buffer_.size()) flush();
    }
  }

  void finish() {
    if (used_ > 0) flush();
  }

 private:
  void flush() {
    file_.write_at(buffer_.data(), used_, written_);
    written_ += used_;
    used_ = 0;
    if (progress_) progress_(written_, total_bytes_);
  }

  File& file_;
  AlignedBuffer buffer_;
  int64_t used_ = 0;
  int64_t written_ = 0;
  int64_t total_bytes_;
  const IoProgress& progress_;
};

}  // namespace

uint64_t block_checksum(const void* data, int64_t bytes) { return XXH3_64bits(data, static_cast<size_t>(bytes)); }

SegmentInfo write_segment(const std::filesystem::path& path, const SegmentHeader& header,
                          std::span<const SegmentBlockSource> blocks, IoFaultInjector* faults,
                          const IoProgress& progress, const std::function<void(const char* step)>& on_step) {
  const kernels::KvLayout& layout = header.layout;
  if (!layout_is_valid(layout, static_cast<uint32_t>(layout.dtype))) {
    throw std::invalid_argument("KV segment '" + path.string() + "': invalid KV layout " + describe(layout));
  }
  if (blocks.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw std::invalid_argument("KV segment '" + path.string() + "': " + std::to_string(blocks.size()) +
                                " blocks, at most 2^31-1 fit in one segment");
  }
  const Geometry g = geometry_of(layout.block_bytes(), static_cast<int64_t>(blocks.size()));

  std::vector<SegmentEntry> entries;
  entries.reserve(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const SegmentBlockSource& b = blocks[i];
    if (b.data == nullptr || b.tokens < 0 || b.tokens > layout.block_tokens) {
      throw std::invalid_argument("KV segment '" + path.string() + "': block " + std::to_string(i) + " has " +
                                  (b.data == nullptr ? "no data" : std::to_string(b.tokens) + " tokens") +
                                  ", expected data and 0.." + std::to_string(layout.block_tokens) + " tokens");
    }
    entries.push_back({b.content_hash, b.tokens, block_checksum(b.data, g.block_bytes)});
  }

  AlignedBuffer prefix(g.payload_offset);
  encode_prefix(static_cast<unsigned char*>(prefix.data()), header, entries, g);
  const uint64_t footer_hash = XXH3_64bits(prefix.data(), static_cast<size_t>(g.payload_offset));
  AlignedBuffer footer(kPage);
  auto* f = static_cast<unsigned char*>(footer.data());
  std::memcpy(f, kFooterMagic.data(), kFooterMagic.size());
  put_u64(f + kOffFooterHash, footer_hash);
  put_i64(f + kOffFooterFileBytes, g.file_bytes);

  // Checked here so that the cleanup below, which removes `path` after a failed rename or
  // directory fsync, can never delete a file that was there before.
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    throw IoError("write KV segment '" + path.string() + "': the file already exists; segments are never overwritten",
                  EEXIST);
  }
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  remove_file(tmp, faults);  // a stale temp file of a crashed checkpoint
  const std::filesystem::path dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  auto step = [&](const char* name) {
    if (on_step) on_step(name);
  };

  std::optional<File> file;
  bool renamed = false;
  try {
    file.emplace(tmp, File::Mode::create_exclusive, true, faults);
    {
      ChunkWriter writer(*file, g.file_bytes, progress);
      writer.append(prefix.data(), g.payload_offset);
      for (const SegmentBlockSource& b : blocks) {
        writer.append(b.data, g.block_bytes);
        writer.append_zeros(g.stride - g.block_bytes);
      }
      writer.append(footer.data(), kPage);
      writer.finish();
    }
    step("write");
    file->sync();  // NOTE: never retried; a failed fsync aborts the segment
    step("fsync");
    file.reset();
    rename_file(tmp, path, faults);
    renamed = true;
    step("rename");
    sync_directory(dir, faults);
    step("fsync_dir");
  } catch (...) {
    // Best effort: the original error is what the caller needs. After a rename the segment is
    // removed again (the caller will not commit a segment whose write threw), so a failure
    // never leaves a file at `path`.
    file.reset();
    try {
      remove_file(tmp, faults);
    } catch (...) {
    }
    if (renamed) {
      try {
        remove_file(path, faults);
        sync_directory(dir, faults);
      } catch (...) {
      }
    }
    throw;
  }
  return SegmentInfo{path, g.file_bytes, footer_hash, std::move(entries)};
}

SegmentReader::SegmentReader(const std::filesystem::path& path, const SegmentHeader& expected,
                             uint64_t expected_footer_hash, IoFaultInjector* faults)
    : file_(path, File::Mode::read, true, faults) {
  auto corrupt = [&](const std::string& what) {
    return CorruptSegment("KV segment '" + path.string() + "' does not verify: " + what +
                          "; the segment cannot be used (delete it and recompute the KV)");
  };
  const int64_t file_bytes = file_.size();
  if (file_bytes < 2 * kPage || file_bytes % kPage != 0) {
    throw corrupt("it is " + std::to_string(file_bytes) + " bytes, not a whole number of " + std::to_string(kPage) +
                  "-byte pages of at least two (truncated?)");
  }
  AlignedBuffer first(kPage);
  file_.read_at(first.data(), kPage, 0);
  const auto* h = static_cast<const unsigned char*>(first.data());
  if (std::memcmp(h + kOffMagic, kMagic.data(), kMagic.size()) != 0) throw corrupt("bad magic, not a KV segment");
  const uint32_t version = get_u32(h + kOffVersion);
  if (version != kVersion) {
    throw corrupt("format version " + std::to_string(version) + ", this build reads version " +
                  std::to_string(kVersion));
  }
  header_.model_fingerprint = get_u64(h + kOffFingerprint);
  header_.session_id = get_u64(h + kOffSessionId);
  header_.generation = get_u64(h + kOffGeneration);
  header_.layout.n_layers = get_i32(h + kOffLayers);
  header_.layout.n_kv_heads = get_i32(h + kOffKvHeads);
  header_.layout.head_dim = get_i32(h + kOffHeadDim);
  header_.layout.block_tokens = get_i32(h + kOffBlockTokens);
  const uint32_t dtype = get_u32(h + kOffDtype);
  const int64_t n_blocks = get_i64(h + kOffBlockCount);
  stride_ = get_i64(h + kOffBlockStride);
  payload_offset_ = get_i64(h + kOffPayloadOffset);
  const int64_t block_bytes = get_i64(h + kOffBlockBytes);
  if (!layout_is_valid(header_.layout, dtype)) throw corrupt("the header holds an impossible KV layout");
  header_.layout.dtype = static_cast<kernels::DType>(dtype);
  // Each block takes at least a page, so this bound also keeps the arithmetic below in range.
  if (n_blocks < 0 || n_blocks > file_bytes / kPage) {
    throw corrupt("the header claims " + std::to_string(n_blocks) + " blocks");
  }
  const Geometry g = geometry_of(header_.layout.block_bytes(), n_blocks);
  if (block_bytes != g.block_bytes || stride_ != g.stride || payload_offset_ != g.payload_offset) {
    throw corrupt("the header's block size, stride or payload offset disagree with its layout");
  }
  if (file_bytes != g.file_bytes) {
    throw corrupt("it is " + std::to_string(file_bytes) + " bytes but its header describes " +
                  std::to_string(g.file_bytes) + " (truncated or overwritten?)");
  }

  AlignedBuffer prefix(g.payload_offset);
  file_.read_at(prefix.data(), g.payload_offset, 0);
  AlignedBuffer footer(kPage);
  file_.read_at(footer.data(), kPage, g.footer_offset);
  const auto* f = static_cast<const unsigned char*>(footer.data());
  if (std::memcmp(f, kFooterMagic.data(), kFooterMagic.size()) != 0) throw corrupt("bad footer magic");
  if (get_i64(f + kOffFooterFileBytes) != file_bytes) {
    throw corrupt("the footer records " + std::to_string(get_i64(f + kOffFooterFileBytes)) + " bytes, the file has " +
                  std::to_string(file_bytes));
  }
  const uint64_t stored_hash = get_u64(f + kOffFooterHash);
  const uint64_t computed_hash = XXH3_64bits(prefix.data(), static_cast<size_t>(g.payload_offset));
  if (stored_hash != computed_hash) {
    throw corrupt("header/table checksum " + hex(computed_hash) + " differs from the footer's " + hex(stored_hash));
  }
  if (expected_footer_hash != 0 && stored_hash != expected_footer_hash) {
    throw corrupt("footer hash " + hex(stored_hash) + " differs from the expected " + hex(expected_footer_hash) +
                  " (a different segment under this name?)");
  }
  // Integrity first, expectations second: a mismatch below is a real file of another model.
  if (header_.model_fingerprint != expected.model_fingerprint) {
    throw corrupt("written for model fingerprint " + hex(header_.model_fingerprint) + ", expected " +
                  hex(expected.model_fingerprint));
  }
  if (header_.layout != expected.layout) {
    throw corrupt("KV layout " + describe(header_.layout) + ", expected " + describe(expected.layout));
  }

  entries_.reserve(static_cast<size_t>(n_blocks));
  const auto* e = static_cast<const unsigned char*>(prefix.data()) + kHeaderBytes;
  for (int64_t i = 0; i < n_blocks; ++i, e += kEntryBytes) {
    SegmentEntry entry{get_u64(e), get_i32(e + 8), get_u64(e + 16)};
    if (entry.tokens < 0 || entry.tokens > header_.layout.block_tokens) {
      throw corrupt("block " + std::to_string(i) + " claims " + std::to_string(entry.tokens) + " tokens");
    }
    entries_.push_back(entry);
  }
}

void SegmentReader::read_blocks(std::span<const int32_t> indices, std::span<void* const> destinations,
                                const IoProgress& progress) const {
  if (indices.size() != destinations.size()) {
    throw std::invalid_argument("KV segment '" + file_.path().string() + "': " + std::to_string(indices.size()) +
                                " block indices but " + std::to_string(destinations.size()) + " destinations");
  }
  const auto n_blocks = static_cast<int64_t>(entries_.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    if (indices[i] < 0 || indices[i] >= n_blocks) {
      throw std::out_of_range("KV segment '" + file_.path().string() + "': block " + std::to_string(indices[i]) +
                              " requested, it holds " + std::to_string(n_blocks));
    }
    if (destinations[i] == nullptr) {
      throw std::invalid_argument("KV segment '" + file_.path().string() + "': null destination for block " +
                                  std::to_string(indices[i]));
    }
  }
  const int64_t block_bytes = header_.layout.block_bytes();
  const int64_t total_bytes = static_cast<int64_t>(indices.size()) * block_bytes;

  // Ascending block order turns adjacent requests into single reads, whatever order they came in.
  std::vector<size_t> order(indices.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return indices[a] < indices[b]; });

  const int64_t max_run_blocks = std::max<int64_t>(1, kChunkBytes / stride_);
  // Reading straight into the destination needs no padding between blocks (stride equals
  // block_bytes) and, under O_DIRECT, an aligned address.
  auto straight = [&](size_t pos) {
    return stride_ == block_bytes &&
           (!file_.is_direct() || reinterpret_cast<uintptr_t>(destinations[pos]) % kDirectIoAlignment == 0);
  };
  AlignedBuffer bounce;
  int64_t done_bytes = 0;
  size_t k = 0;
  while (k < order.size()) {
    const bool into_destination = straight(order[k]);
    size_t end = k + 1;
    while (end < order.size() && static_cast<int64_t>(end - k) < max_run_blocks &&
           indices[order[end]] == indices[order[end - 1]] + 1 &&
           (!into_destination || static_cast<char*>(destinations[order[end]]) ==
                                     static_cast<char*>(destinations[order[end - 1]]) + stride_)) {
      ++end;
    }
    const auto run_blocks = static_cast<int64_t>(end - k);
    const int64_t offset = payload_offset_ + indices[order[k]] * stride_;
    unsigned char* landing;
    if (into_destination) {
      landing = static_cast<unsigned char*>(destinations[order[k]]);
    } else {
      if (bounce.size() < run_blocks * stride_) {
        bounce = AlignedBuffer(std::min(max_run_blocks, static_cast<int64_t>(order.size())) * stride_);
      }
      landing = static_cast<unsigned char*>(bounce.data());
    }
    file_.read_at(landing, run_blocks * stride_, offset);
    for (size_t j = k; j < end; ++j) {
      const int32_t index = indices[order[j]];
      const unsigned char* block = landing + static_cast<int64_t>(j - k) * stride_;
      const uint64_t sum = block_checksum(block, block_bytes);
      if (sum != entries_[static_cast<size_t>(index)].checksum) {
        throw CorruptSegment("KV segment '" + file_.path().string() + "': block " + std::to_string(index) +
                             " fails its checksum (stored " + hex(entries_[static_cast<size_t>(index)].checksum) +
                             ", read " + hex(sum) + "); recompute its KV");
      }
      if (!into_destination) std::memcpy(destinations[order[j]], block, static_cast<size_t>(block_bytes));
    }
    done_bytes += run_blocks * block_bytes;
    if (progress) progress(done_bytes, total_bytes);
    k = end;
  }
}

}  // namespace den::memory
