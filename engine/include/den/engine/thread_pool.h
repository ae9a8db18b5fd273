// A fixed pool of worker threads for data-parallel loops (the CPU backend's matrix products
// and attention). The calling thread works too; run() returns when every thread is done and
// rethrows the first exception a task threw. Not reentrant: one run() at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace den::engine {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads <= 0: one per hardware thread
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls task(thread_index) once on each of size() threads.
  void run(const std::function<void(int thread_index)>& task);

  // Splits [0, n) into size() contiguous chunks: body(begin, end, thread_index).
  template <typename Body>
  void parallel_for(int64_t n, Body&& body) {
    if (n <= 0) return;
    const int64_t threads = n_threads_;
    run([&](int t) {
      const int64_t begin = n * t / threads;
      const int64_t end = n * (t + 1) / threads;
      if (begin < end) body(begin, end, t);
    });
  }

 private:
  void worker(int index);
  void execute(int index) noexcept;

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stopping_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace den::engine
