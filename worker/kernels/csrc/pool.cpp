// The kernels' thread pool (pool.h says why and how): one per process, helpers started by
// `configure` and never stopped (they sleep when there is nothing to do).
#include "pool.h"

#include <immintrin.h>
#include <pthread.h>

#include <chrono>
#include <exception>
#include <iterator>
#include <mutex>
#include <thread>

namespace spindle_pool {

enum : uint8_t { OPEN = 0, STORING = 1, STORED = 2 };
// The least the caller of a speculative region waits for another thread's item before computing
// it too (for items that take a few microseconds, waking and memory latency dominate).
constexpr int64_t MIN_PATIENCE_NS = 20000;

struct Region {
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  // Plain regions: the caller's function, alive until done == count (nobody calls it after).
  const std::function<void(int64_t)>* plain = nullptr;
  // Speculative regions: the region's own copy, each item's state, the tensors the items read.
  std::function<void(int64_t)> owned;
  std::unique_ptr<std::atomic<uint8_t>[]> state;
  std::vector<at::Tensor> keep;
  std::mutex error_mutex;
  std::exception_ptr error;  // the first item that threw (plain regions)
  std::atomic<int> helpers_inside{0};  // helpers that may still touch it; freed at 0
};

namespace {

thread_local Region* item_region = nullptr;  // the region whose item this thread is running
thread_local int64_t item_index = 0;

struct Pool {
  std::atomic<int> threads{0};
  std::atomic<bool> speculate_all{false};
  std::atomic<int> spin_us{200};
  int helpers = 0;
  std::mutex mutex;  // guards `current` and `retired`
  std::shared_ptr<Region> current;
  // Finished regions a late helper is still inside. A region is freed on the caller's thread,
  // never a helper's: freeing it drops its tensors, and a tensor Python also holds takes the GIL
  // to go (a helper would block on it behind whichever Python thread holds it).
  std::vector<std::shared_ptr<Region>> retired;
  std::atomic<uint32_t> epoch{0};  // bumped for every region; helpers wait on it
  std::atomic<int> sleepers{0};
  // What happened, for tests and tuning (pool_stats()).
  std::atomic<int64_t> regions{0}, helper_items{0}, second_runs{0}, sleeps{0};
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: helpers may outlive static teardown
  return *instance;
}

void run_item(Region& region, int64_t index) {
  Region* outer_region = item_region;
  const int64_t outer_index = item_index;
  item_region = &region;
  item_index = index;
  if (region.plain != nullptr) {
    try {
      (*region.plain)(index);
    } catch (...) {
      std::lock_guard<std::mutex> lock(region.error_mutex);
      if (!region.error) region.error = std::current_exception();
    }
    region.done.fetch_add(1, std::memory_order_acq_rel);
  } else {
    region.owned(index);  // counted as done by commit()
  }
  item_region = outer_region;
  item_index = outer_index;
}

int64_t take_items(Region& region) {
  int64_t taken = 0;
  for (int64_t i = region.next++; i < region.count; i = region.next++, ++taken) run_item(region, i);
  return taken;
}

void serve(Pool& p) {
  pthread_setname_np(pthread_self(), "spindle-pool");  // how it shows in top -H and py-spy
  uint32_t seen = p.epoch.load();
  for (;;) {
    const auto start = std::chrono::steady_clock::now();
    const auto spin = std::chrono::microseconds(p.spin_us.load(std::memory_order_relaxed));
    for (int polls = 1; p.epoch.load() == seen; ++polls) {
      _mm_pause();
      if (polls % 64 == 0 && std::chrono::steady_clock::now() - start > spin) {
        p.sleeps.fetch_add(1, std::memory_order_relaxed);
        p.sleepers.fetch_add(1);
        p.epoch.wait(seen);
        p.sleepers.fetch_sub(1);
      }
    }
    seen = p.epoch.load();
    Region* region = nullptr;
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      if (p.current) {
        region = p.current.get();
        region->helpers_inside.fetch_add(1);
      }
    }
    if (region != nullptr) {
      p.helper_items.fetch_add(take_items(*region), std::memory_order_relaxed);
      region->helpers_inside.fetch_sub(1);  // the caller frees it from here on
    }
  }
}

void publish(Pool& p, const std::shared_ptr<Region>& region) {
  p.regions.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.current = region;
  }
  p.epoch.fetch_add(1);
  if (p.sleepers.load() > 0) p.epoch.notify_all();
}

// Called by the region's caller once every item is done: frees it (with the finished regions no
// helper is inside any more), or keeps it until the late helpers inside have left.
void retire(Pool& p, std::shared_ptr<Region> region) {
  std::vector<std::shared_ptr<Region>> freed;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(p.mutex);
  if (p.current == region) p.current.reset();
  if (region->helpers_inside.load() > 0) p.retired.push_back(std::move(region));
  auto still_used = std::partition(p.retired.begin(), p.retired.end(), [](const auto& r) {
    return r->helpers_inside.load() > 0;
  });
  std::move(still_used, p.retired.end(), std::back_inserter(freed));
  p.retired.erase(still_used, p.retired.end());
}

// The caller, out of new items: waits for the other threads' items for as long as `patience`
// (twice its own items' time: a thread still running finishes within it), then computes each item
// still open itself, until every item is stored.
void finish_speculatively(Region& region, std::chrono::nanoseconds patience) {
  const auto start = std::chrono::steady_clock::now();
  for (int polls = 1; region.done.load(std::memory_order_acquire) < region.count; ++polls) {
    _mm_pause();
    if (polls % 16 == 0 && std::chrono::steady_clock::now() - start > patience) break;
  }
  while (region.done.load(std::memory_order_acquire) < region.count) {
    int64_t open = -1;
    for (int64_t i = region.count - 1; i >= 0; --i) {
      if (region.state[i].load(std::memory_order_acquire) == OPEN) {
        open = i;
        break;
      }
    }
    if (open < 0) {
      _mm_pause();  // another thread is storing the last items
      continue;
    }
    pool().second_runs.fetch_add(1, std::memory_order_relaxed);
    run_item(region, open);
  }
}

// take_items for the caller of a speculative region: how long its items took, on average.
std::chrono::nanoseconds take_items_timed(Region& region) {
  const auto start = std::chrono::steady_clock::now();
  const int64_t taken = take_items(region);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  return taken > 0 ? elapsed / taken : std::chrono::nanoseconds(MIN_PATIENCE_NS);
}

}  // namespace

int threads() { return pool().threads.load(std::memory_order_relaxed); }

std::vector<int64_t> stats() {
  Pool& p = pool();
  return {p.regions.load(), p.helper_items.load(), p.second_runs.load(), p.sleeps.load()};
}

void configure(int threads, bool speculate_all, int spin_us) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.speculate_all = speculate_all;
  p.spin_us = std::max(0, spin_us);
  const int wanted = threads >= 2 ? threads : 0;
  for (; p.helpers < wanted - 1; ++p.helpers) std::thread([&p] { serve(p); }).detach();
  // Fewer threads than helpers started: the extra helpers stay; items go to whoever takes them.
  p.threads = wanted;
}

void run(int64_t count, const std::function<void(int64_t)>& work) {
  if (count <= 0) return;
  if (item_region != nullptr || threads() == 0) {  // nested, or the pool is off: inline
    for (int64_t i = 0; i < count; ++i) work(i);
    return;
  }
  Pool& p = pool();
  auto region = std::make_shared<Region>();
  region->count = count;
  region->plain = &work;
  publish(p, region);
  take_items(*region);
  while (region->done.load(std::memory_order_acquire) < count) _mm_pause();
  retire(p, region);
  if (region->error) std::rethrow_exception(region->error);
}

void run_speculative(int64_t count, std::vector<at::Tensor> keep,
                     std::function<void(int64_t)> work) {
  if (count <= 0) return;
  Pool& p = pool();
  auto region = std::make_shared<Region>();
  region->count = count;
  region->owned = std::move(work);
  region->keep = std::move(keep);
  region->state.reset(new std::atomic<uint8_t>[count]);
  for (int64_t i = 0; i < count; ++i) region->state[i].store(OPEN, std::memory_order_relaxed);
  if (item_region != nullptr) {  // nested: inline
    take_items(*region);
    return;
  }
  if (threads() == 0) {  // the pool is off: torch's threads, each item once
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) run_item(*region, i);
    });
    return;
  }
  publish(p, region);
  const auto item_time = take_items_timed(*region);
  if (p.speculate_all.load(std::memory_order_relaxed))
    for (int64_t i = 0; i < count; ++i) run_item(*region, i);  // each item a second time
  finish_speculatively(*region, std::max(2 * item_time, std::chrono::nanoseconds(MIN_PATIENCE_NS)));
  retire(p, region);
}

void commit(const std::function<void()>& store) {
  Region& region = *item_region;
  uint8_t open = OPEN;
  if (!region.state[item_index].compare_exchange_strong(open, STORING,
                                                        std::memory_order_acq_rel))
    return;  // another thread stored this item (or is storing it)
  store();
  region.state[item_index].store(STORED, std::memory_order_release);
  region.done.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace spindle_pool
