// A channel: a ring of `slots` message slots in shared memory between one writer and any number
// of readers (each reads every message). The writer waits while the slowest reader is `slots`
// messages behind (backpressure); readers wait for the next message. Waits spin briefly (yielding
// the CPU between looks), then sleep on a futex. A message larger than a slot goes to a segment of
// its own for that slot, replaced (and the old one unlinked) when a still larger one comes.
// close() wakes every waiter.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace trellis::channel {

constexpr uint32_t kMaxReaders = 64;

enum class WaitResult { kReady, kTimeout, kClosed };

class Channel {
 public:
  // Creates the channel's segment; the creator unlinks it (and its overflow segments) on Destroy.
  static void Create(const std::string& name, uint32_t slots, uint32_t readers, uint64_t slot_bytes);
  static void Destroy(const std::string& name);

  // Opens as the writer (reader < 0) or as reader number `reader`.
  Channel(const std::string& name, int reader);
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Writer: true once there is room for one more message; waits up to timeout_ms (-1: forever,
  // 0: just look), spinning first for spin_us.
  WaitResult WaitWritable(int64_t timeout_ms, int64_t spin_us);
  // Writer: writes one message (WaitWritable must have said kReady).
  void Write(const uint8_t* bytes, uint64_t length);
  // Reader: waits for the next message.
  WaitResult WaitReadable(int64_t timeout_ms, int64_t spin_us);
  // Reader: the next message's bytes (valid until Advance).
  const uint8_t* Peek(uint64_t* length);
  // Reader: done with the current message.
  void Advance();

  // Reader: it is done with the first `count` messages it read (not only read them: a CUDA IPC
  // message's memory stays in use until the execution that read it ends). Never moves back.
  void Finish(uint64_t count);
  // Writer: how many messages every reader is done with (the slowest reader's Finish).
  uint64_t finished() const;

  void Close();
  bool closed() const;
  uint64_t written() const;
  uint64_t read() const;

 private:
  struct Header;
  struct Slot;
  struct Mapping {
    uint8_t* base = nullptr;
    uint64_t size = 0;
    uint32_t generation = 0;
  };
  uint64_t SlowestReader() const;
  uint8_t* SlotData(uint32_t slot, uint64_t need_for_write);
  const uint8_t* SlotDataForRead(uint32_t slot);
  void Unmap(Mapping& mapping);
  std::string OverflowName(uint32_t slot, uint32_t generation) const;

  std::string name_;
  int reader_;
  uint8_t* base_ = nullptr;
  uint64_t mapped_ = 0;
  Header* header_ = nullptr;
  std::vector<Mapping> overflow_;  // per slot: this process's mapping of its overflow segment
};

}  // namespace trellis::channel
