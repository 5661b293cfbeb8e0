// A communicator over shared memory between processes on one node: the CPU twin of an NCCL
// communicator, with the same collectives and point-to-point semantics. Pure C++ (no Node-API).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace trellis::collective {

enum class DataType : uint32_t { kF32 = 0, kF16, kBF16, kI8, kU8, kI32, kI64 };
enum class ReduceOp : uint32_t { kSum = 0, kProd, kMin, kMax, kAvg };

size_t ElementSize(DataType type);

// One pending point-to-point transfer within a group.
struct PeerTransfer {
  bool send;
  int peer;
  uint8_t* data;
  uint64_t bytes;
  uint64_t done = 0;
};

class ShmCommunicator {
 public:
  // Creates the group's segment (the driver does this once per group).
  static void CreateSegment(const std::string& name, int size, uint64_t slot_bytes);
  static void UnlinkSegment(const std::string& name);

  // Joins as `rank`; waits for nobody (collectives wait for their peers).
  ShmCommunicator(const std::string& name, int rank, int size, int64_t timeout_ms);
  ~ShmCommunicator();
  ShmCommunicator(const ShmCommunicator&) = delete;
  ShmCommunicator& operator=(const ShmCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  void AllReduce(uint8_t* data, uint64_t count, DataType type, ReduceOp op);
  void AllGather(const uint8_t* input, uint8_t* output, uint64_t input_bytes);
  void ReduceScatter(const uint8_t* input, uint8_t* output, uint64_t output_count, DataType type, ReduceOp op);
  void Broadcast(uint8_t* data, uint64_t bytes, int root);
  // Runs every transfer to completion, making progress on all at once (no send/recv deadlock).
  void Transfer(std::vector<PeerTransfer>& transfers);
  void Barrier();
  // Marks the group aborted: every rank's pending and later operations fail.
  void Abort(const std::string& reason);
  bool aborted() const;

 private:
  struct Header;
  struct Mailbox;
  void Wait(std::atomic<uint32_t>* word, uint32_t seen, const char* what);
  void CheckHealthy(const char* what);
  uint8_t* Slot(int rank) const;
  uint8_t* Scratch() const;
  Mailbox* MailboxFor(int from, int to) const;
  uint8_t* MailboxData(int from, int to) const;

  std::string name_;
  int rank_;
  int size_;
  int64_t timeout_ms_;
  uint8_t* base_ = nullptr;
  uint64_t mapped_ = 0;
  Header* header_ = nullptr;
  uint32_t barrier_generation_ = 0;
};

}  // namespace trellis::collective
