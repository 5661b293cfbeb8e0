// The layout of one object-store segment. Everything here lives in shared memory and is read and
// written by every process that maps the segment, under the segment's robust mutex.
//
// Crash safety rests on one rule: the object entries (and pin records) are the source of truth,
// and everything else (the id index, free lists, block headers, pin lists and counts, usage stats)
// is derived from them and can be rebuilt. A process that dies inside the lock leaves at worst a
// half-done update of derived data or an entry that was never committed; the next locker sees
// EOWNERDEAD and rebuilds. An entry becomes visible only when its `state` is written, last.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace trellis::store {

constexpr uint64_t kSegmentMagic = 0x45524f5453524c54ull;  // "TLRSTORE" little-endian
constexpr uint32_t kLayoutVersion = 3;
constexpr uint64_t kAlignment = 64;
constexpr uint64_t kBlockHeaderSize = 64;
constexpr uint64_t kMinSplitRemainder = 2 * kBlockHeaderSize;
constexpr uint32_t kMaxProcesses = 1024;
constexpr uint32_t kBinCount = 64;
constexpr uint32_t kNil = UINT32_MAX;
constexpr size_t kObjectIdBytes = 20;
constexpr size_t kSpillDirectoryBytes = 512;

enum class ObjectState : uint32_t {
  kFree = 0,       // entry unused
  kCreated = 1,    // allocated, being written by its creator
  kSealed = 2,     // immutable, readable
  kSpilling = 3,   // sealed and still resident, being written to a spill file by `busy_slot`
  kSpilled = 4,    // only in its spill file
  kRestoring = 5,  // block allocated, being read back from the spill file by `busy_slot`
};

constexpr uint32_t kFlagDeleted = 1;  // delete requested while pinned or busy: freed when both end

struct ObjectEntry {
  uint8_t id[kObjectIdBytes];
  std::atomic<uint32_t> state;
  uint32_t flags;
  uint32_t creator;     // process slot of the creator while kCreated
  uint32_t busy_slot;   // process slot spilling or restoring it
  uint32_t generation;  // bumped each time the entry is committed, so a stale handle is detected
  uint32_t pin_count;   // derived: sum of this entry's pin records
  uint32_t pin_head;    // derived: first pin record of this entry
  uint32_t next_free;   // derived: entry free list
  uint64_t block;       // offset of the block header within the data region, while resident
  uint64_t block_size;  // whole block, header included
  uint64_t data_size;
  uint64_t metadata_size;
  uint64_t last_access;  // store clock at the last get, for choosing what to spill
};
static_assert(sizeof(ObjectEntry) == 96);

// One process's pins on one entry.
struct PinRecord {
  uint32_t entry;
  uint32_t process;
  std::atomic<uint32_t> count;  // 0: record free
  uint32_t next;                // derived: next record of the same entry, or next free record
};
static_assert(sizeof(PinRecord) == 16);

struct ProcessSlot {
  int32_t pid;  // 0: slot free
  uint32_t reserved;
  uint64_t start_time;  // from /proc/<pid>/stat, so a recycled pid is not taken for the old process
};

// Precedes every block in the data region.
struct BlockHeader {
  uint64_t size;       // whole block, header included; a multiple of kAlignment
  uint64_t prev_size;  // size of the block just below, 0 for the first
  uint64_t next_free;  // data offset + 1 of the next block in this bin, 0 for none
  uint64_t prev_free;
  uint32_t is_free;
  uint32_t entry;
  uint64_t magic;
  uint64_t reserved[2];
};
static_assert(sizeof(BlockHeader) == kBlockHeaderSize);
constexpr uint64_t kBlockMagic = 0x4b434f4c42534c54ull;

struct SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t creator_pid;
  uint64_t segment_size;
  uint64_t data_offset;
  uint64_t data_size;
  uint64_t entries_offset;
  uint64_t pins_offset;
  uint64_t index_offset;
  uint64_t processes_offset;
  uint32_t max_objects;
  uint32_t max_pins;
  uint32_t index_size;  // power of two
  uint32_t reserved0;

  pthread_mutex_t mutex;

  // Allocator: blocks tile [0, top); above `top` is untouched wilderness.
  std::atomic<uint64_t> top;
  uint64_t top_previous_size;  // size of the block that ends at `top`, 0 when top is 0
  uint64_t bins[kBinCount];  // data offset + 1 of the first free block of each size class

  // Free lists of entries and pin records (derived).
  uint32_t free_entry_head;
  uint32_t free_pin_head;
  uint32_t index_used;
  uint32_t index_tombstones;
  // One past the highest entry and pin record ever taken from the free lists (which hand out low
  // indices first): scans for a dead process's pins and objects, and for a spill victim, stop
  // here instead of walking tables sized for the store's maximum.
  uint32_t entries_high_water;
  uint32_t pins_high_water;

  // Statistics: the first group is derived, the second cumulative. Kept as running counts so that
  // reading them costs no scan of the tables under the lock.
  uint64_t bytes_in_use;
  uint64_t object_count;
  uint64_t spilled_objects;
  uint64_t spilled_bytes;
  uint64_t pinned_objects;      // entries with a pin, deleted ones included
  uint64_t attached_processes;  // process slots in use, dead ones included until reaped
  uint64_t total_spilled_bytes;
  uint64_t total_restored_bytes;
  uint64_t total_spilled_objects;
  uint64_t total_restored_objects;
  uint64_t recoveries;
  uint64_t clock;

  // Wakeups across processes (futex words).
  std::atomic<uint32_t> seal_sequence;  // bumped on every seal, restore and delete
  std::atomic<uint32_t> seal_waiters;
  std::atomic<uint32_t> prefault_sequence;
  uint32_t reserved1;
  std::atomic<uint64_t> prefaulted;  // bytes of the data region known to be faulted in
  uint64_t prefault_window;

  char spill_directory[kSpillDirectoryBytes];
};

inline uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

}  // namespace trellis::store
