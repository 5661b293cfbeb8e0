// A connection ring: two single-producer, single-consumer byte rings in one shared-memory file,
// one per direction of a driver-worker connection. The socket stays: it carries batches too large
// for the ring's free space and a doorbell byte-batch when the reader sleeps, so a reader that is
// awake (running JS, or spinning before its loop sleeps) receives a message without a system call
// on either side.
//
// Sleeping is announced, not guessed: before its event loop blocks the reader marks the ring
// sleeping and then looks at it once more; after writing, the writer looks at the mark. Each side
// stores, fences, then loads, so at least one of them sees the other: either the reader finds the
// bytes before it sleeps or the writer rings. Only the writer that moves the mark from sleeping
// to rung rings, so a burst of writes rings once.
//
// The file comes from memfd_create: nothing has a name to leak, and it goes with the last mapping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace trellis::channel {

class ConnectionRing {
 public:
  // Which end this process is: the creator writes the first direction and reads the second.
  enum class Side { kCreator, kPeer };
  enum class WriteResult { kWritten, kWrittenRing, kFull };

  // Makes the file and maps it; fd() is what the peer opens.
  static ConnectionRing Create(uint64_t capacity);
  // Maps a file made by Create (the descriptor is the caller's; Open does not close it).
  static ConnectionRing Open(int fd);

  ConnectionRing(ConnectionRing&& other) noexcept;
  ConnectionRing& operator=(ConnectionRing&&) = delete;
  ConnectionRing(const ConnectionRing&) = delete;
  ConnectionRing& operator=(const ConnectionRing&) = delete;
  ~ConnectionRing();

  // The creator's descriptor, open until CloseFd (-1 after, and always for a peer).
  int fd() const { return fd_; }
  void CloseFd();
  uint64_t capacity() const { return capacity_; }

  // Writer: copies `length` bytes as one unit (the reader never sees part of it), or kFull when
  // there is not room for all of it. kWrittenRing: the reader sleeps and no one has rung it yet.
  WriteResult Write(const uint8_t* bytes, uint64_t length);

  // Reader: bytes written and not yet taken.
  bool Readable() const;
  // Reader: bytes written and not yet taken.
  uint64_t Available() const;
  // Reader: copies the next `length` bytes (at most Available()) out; their room is the writer's again.
  void Take(uint8_t* into, uint64_t length);
  // Reader: about to sleep. False when bytes arrived meanwhile (then it stays awake to read them).
  bool MarkSleeping();
  // Reader: the loop woke.
  void MarkAwake();

 private:
  struct Direction;
  struct Layout;
  static uint64_t DataOffset();
  ConnectionRing(int fd, uint8_t* base, uint64_t mapped, uint64_t capacity, Side side);
  Direction& outgoing() const;
  Direction& incoming() const;
  uint8_t* outgoing_data() const;
  uint8_t* incoming_data() const;

  int fd_ = -1;
  uint8_t* base_ = nullptr;
  uint64_t mapped_ = 0;
  uint64_t capacity_ = 0;
  Side side_ = Side::kCreator;
};

}  // namespace trellis::channel
