// The floor for compiled graphs: two processes hand a token back and forth through a futex in
// shared memory, each sleeping until woken (no spinning). Prints the median round trip in us.
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

static void Wait(std::atomic<uint32_t>* word, uint32_t value) {
  while (word->load() == value) syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, value, nullptr, nullptr, 0);
}

static void Wake(std::atomic<uint32_t>* word) { syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

int main(int argc, char** argv) {
  int rounds = argc > 1 ? std::atoi(argv[1]) : 20000;
  void* memory = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return 1;
  auto* ping = new (memory) std::atomic<uint32_t>(0);
  auto* pong = new (static_cast<char*>(memory) + 64) std::atomic<uint32_t>(0);
  pid_t child = fork();
  if (child == 0) {
    for (int i = 0; i < rounds; ++i) {
      Wait(ping, static_cast<uint32_t>(i));
      pong->store(static_cast<uint32_t>(i + 1));
      Wake(pong);
    }
    _exit(0);
  }
  std::vector<double> times;
  times.reserve(rounds);
  for (int i = 0; i < rounds; ++i) {
    auto start = std::chrono::steady_clock::now();
    ping->store(static_cast<uint32_t>(i + 1));
    Wake(ping);
    Wait(pong, static_cast<uint32_t>(i));
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  waitpid(child, nullptr, 0);
  std::sort(times.begin(), times.end());
  std::printf("%.3f\n", times[times.size() / 2]);
  return 0;
}
