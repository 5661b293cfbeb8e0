// Shared host memory this process maps for the life of a segment (the object store's), known by
// address so that a GPU copy from or to it can page-lock the part it touches on first use and
// copy by DMA. Whoever page-locks part of a mapping registers a removal hook, which runs before
// the mapping goes (page-locked memory must be unlocked before munmap).
#pragma once

#include <cstddef>

namespace trellis::host_mappings {

void Add(void* base, size_t size);
// Runs the removal hook for [base, base + size), then forgets the mapping. Call before munmap.
void Remove(void* base, size_t size);
// The mapping that holds all of [data, data + length), if any.
bool Find(const void* data, size_t length, void** base, size_t* size);

using RemovalHook = void (*)(void* base, size_t size);
void SetRemovalHook(RemovalHook hook);

}  // namespace trellis::host_mappings
