// ParallelFor over XLA:CPU's intra-op thread pool, shared by jbn's FFI kernels.
#ifndef JBN_NATIVE_CSRC_PARALLEL_FOR_H_
#define JBN_NATIVE_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jbn {

// Worker threads a kernel may use: the pool's threads (at least one).
inline int64_t Workers(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// Runs f(task, worker) for task 0 .. tasks - 1 on the calling thread (worker 0)
// and up to `workers - 1` pool threads (workers 1, 2, ...), and returns when all
// have finished. Tasks are claimed from a shared counter, so the calling thread
// runs every task that no pool thread has started: it never waits for a task
// that is still queued (no deadlock when the pool is busy). Which worker runs
// a task must not change its result.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t workers, int64_t tasks, const F& f) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t finished = 0;
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, &f](int64_t worker) {
    int64_t done = 0;
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks; ++done) f(t, worker);
    if (done == 0) return;
    std::lock_guard<std::mutex> lock(state->mu);
    state->finished += done;
    state->cv.notify_all();
  };
  for (int64_t w = 1; w < std::min(workers, tasks); ++w) {
    // A late pool task finds no work left and touches only the shared state.
    pool.Schedule([state, tasks, work, w] {
      if (state->next.load() < tasks) work(w);
    });
  }
  work(0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == tasks; });
}

}  // namespace jbn

#endif  // JBN_NATIVE_CSRC_PARALLEL_FOR_H_
