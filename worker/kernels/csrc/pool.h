// The threads spindle's CPU kernels run their parallel work on, in place of torch's OpenMP team.
//
// Why not OpenMP: the worker shares its cores with the gateway, Redis and the clients. When one of
// them takes a core for a few milliseconds, an OpenMP team (static split, a barrier at the end of
// every parallel region) stops: the other thread finishes its half and waits at the barrier for
// the descheduled one. Measured (README, "The in-process engine"): with this pool the engine runs
// mixed-32 6-7 % faster on its own, but beside a process taking 5 % of the CPU it loses about as
// much as on OpenMP (4-9 % either way): half the time the preempted thread is the caller, which
// drives every region from Python, and nothing can take over from it.
//
// Here a parallel region is a count of items; every thread, the caller's included, takes the next
// item from a shared counter, and the caller returns when every item is done, never waiting for a
// thread to arrive. An item a descheduled thread holds would still hold the caller up, so items
// that may be computed twice run *speculatively* (`run_speculative`): the caller, out of new items
// and having waited twice its own items' time, computes the ones still open itself, each into its
// own thread's scratch, and whichever thread finishes an item first stores it (`commit`); the
// other's copy is dropped. A region keeps the tensors its items read alive (`keep`), so a late
// thread finishing a copy nobody needs reads valid memory; it never stores; regions are freed on
// the caller's thread (freeing a tensor Python also holds takes the GIL, which a helper would wait
// for behind whichever Python thread has it). Items whose inputs hold indices (attention's block tables) run without
// speculation: computing on inputs the caller has since changed could read out of bounds.
//
// The pool is off (every call goes to at::parallel_for on torch's threads) until `configure` turns
// it on, which the model runner does for CPU models (worker/kernels/__init__.py: use_threads);
// then torch's own ops run on one thread. Helpers spin `spin_us` after a region for the next one,
// then sleep on a futex. Regions run from inside an item run inline.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace spindle_pool {

struct Region;

// Threads the pool runs regions on, the caller's included; 0 when the pool is off.
int threads();
// `threads` >= 2 turns the pool on with threads - 1 helpers (started once, kept), 0 or 1 turns it
// off. `speculate_all` makes the caller compute every speculative item too (tests: every item is
// then computed twice and stored once). `spin_us`: how long a helper waits awake for the next
// region.
void configure(int threads, bool speculate_all = false, int spin_us = 200);

// Counters since the process started: regions run on the pool, items the helpers took, items the
// caller computed a second time, helper sleeps.
std::vector<int64_t> stats();

// Runs work(i) for every i in [0, count) on the pool's threads; returns when all are done.
void run(int64_t count, const std::function<void(int64_t)>& work);
// The same for items that may run twice: work(i) computes item i into its thread's own scratch
// and stores it with `commit`. `work` is copied (it may outlive this call on a late thread) and
// must capture by value; `keep` holds the tensors it reads.
void run_speculative(int64_t count, std::vector<at::Tensor> keep,
                     std::function<void(int64_t)> work);

// Inside a speculative item: stores it with store() unless another thread stored it first.
void commit(const std::function<void()>& store);

// at::parallel_for's contract (f(begin, end) over chunks of at least `grain`) on the pool.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int n = threads();
  if (n == 0) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(1, grain), (range + n - 1) / n);
  const int64_t chunks = (range + chunk - 1) / chunk;
  if (chunks == 1) {
    f(begin, end);
    return;
  }
  run(chunks, [&](int64_t i) { f(begin + i * chunk, std::min(end, begin + (i + 1) * chunk)); });
}

// The number of threads a region may use: the pool's, else torch's.
inline int64_t max_threads() {
  const int n = threads();
  return n > 0 ? n : at::get_num_threads();
}

}  // namespace spindle_pool
