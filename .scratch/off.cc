#include <cstdio>
#include <cstddef>
#include "store/layout.h"
using namespace trellis::store;
int main(){ printf("mutex %zu size %zu top %zu\n", offsetof(SegmentHeader, mutex), sizeof(pthread_mutex_t), offsetof(SegmentHeader, top)); }
