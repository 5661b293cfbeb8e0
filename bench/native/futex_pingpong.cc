// The floor for compiled graphs: two processes hand a token back and forth through a futex in
// shared memory, each sleeping until woken (no spinning). Prints the median round trip in us.
//   futex_pingpong [rounds] [any|same|cross]
// `any` (the default) leaves placement to the scheduler; `same` pins both processes to one CPU
// (a wake is a context switch, ~7 us a round trip here), `cross` to two (a wake is an
// inter-processor interrupt, ~15 us). Unpinned, the scheduler picks either, so the default's
// figure moves between the two from run to run; prints "nan" when `cross` has one CPU only.
#include <linux/futex.h>
#include <sched.h>
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
#include <cstring>
#include <vector>

static void Wait(std::atomic<uint32_t>* word, uint32_t value) {
  while (word->load() == value) syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, value, nullptr, nullptr, 0);
}

static void Wake(std::atomic<uint32_t>* word) { syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

static void Pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof set, &set);
}

int main(int argc, char** argv) {
  int rounds = argc > 1 ? std::atoi(argv[1]) : 20000;
  const char* mode = argc > 2 ? argv[2] : "any";
  std::vector<int> allowed;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) if (CPU_ISSET(cpu, &set)) allowed.push_back(cpu);
  }
  bool same = std::strcmp(mode, "same") == 0, cross = std::strcmp(mode, "cross") == 0;
  if ((same && allowed.empty()) || (cross && allowed.size() < 2)) {
    std::printf("nan\n");
    return 0;
  }
  void* memory = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return 1;
  auto* ping = new (memory) std::atomic<uint32_t>(0);
  auto* pong = new (static_cast<char*>(memory) + 64) std::atomic<uint32_t>(0);
  pid_t child = fork();
  if (same) Pin(allowed[0]);
  if (cross) Pin(allowed[child == 0 ? 1 : 0]);
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
