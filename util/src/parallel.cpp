// The one thread pool (parallel.hpp).
#include "actsim/util/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace actsim::util {

int hardware_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn, const std::function<void()>& tick) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  std::atomic<int> running{0};
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  const int workers = static_cast<int>(std::min<int64_t>(std::max(threads, 1), n));
  std::vector<std::thread> pool;
  running = workers;
  for (int w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        try {
          fn(i);
        } catch (...) {
          errors[static_cast<size_t>(i)] = std::current_exception();
          next = n;  // stop handing out work
        }
      }
      std::lock_guard<std::mutex> lock(m);
      --running;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(m);
    while (running > 0) {
      cv.wait_for(lock, std::chrono::milliseconds(100));
      if (tick) tick();
    }
  }
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace actsim::util
