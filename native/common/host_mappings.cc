#include "common/host_mappings.h"

#include <cstdint>
#include <map>
#include <mutex>

namespace trellis::host_mappings {
namespace {

std::mutex mutex;
std::map<uintptr_t, size_t>& Mappings() {  // by base address
  static auto* mappings = new std::map<uintptr_t, size_t>();
  return *mappings;
}
RemovalHook removal_hook = nullptr;

}  // namespace

void Add(void* base, size_t size) {
  std::lock_guard<std::mutex> lock(mutex);
  Mappings()[reinterpret_cast<uintptr_t>(base)] = size;
}

void Remove(void* base, size_t size) {
  RemovalHook hook;
  {
    std::lock_guard<std::mutex> lock(mutex);
    Mappings().erase(reinterpret_cast<uintptr_t>(base));
    hook = removal_hook;
  }
  if (hook != nullptr) hook(base, size);
}

bool Find(const void* data, size_t length, void** base, size_t* size) {
  auto start = reinterpret_cast<uintptr_t>(data);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = Mappings().upper_bound(start);
  if (it == Mappings().begin()) return false;
  --it;
  if (start - it->first > it->second || length > it->second - (start - it->first)) return false;
  *base = reinterpret_cast<void*>(it->first);
  *size = it->second;
  return true;
}

void SetRemovalHook(RemovalHook hook) {
  std::lock_guard<std::mutex> lock(mutex);
  removal_hook = hook;
}

}  // namespace trellis::host_mappings
