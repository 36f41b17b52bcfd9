// The work items both prefill attention kernels (paged_prefill.cpp, paged_prefill_amx.cpp) split
// a step's prompt chunks into: (chunk, KV head, run of query positions), longest first so the
// threads taking them from a shared counter finish together despite the causal triangle.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace spindle_prefill {

struct Item {
  int64_t chunk, kv_head, first;  // first: the item's first query position within the chunk
  int64_t cost;                   // keys it reads: for ordering, longest first
};

inline std::vector<Item> make_items(const at::Tensor& q_starts, const at::Tensor& q_lens,
                                    const at::Tensor& context_lens, int64_t kv_heads,
                                    int64_t positions_per_item) {
  const int64_t* lens = q_lens.data_ptr<int64_t>();
  const int64_t* contexts = context_lens.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t c = 0; c < q_starts.size(0); ++c) {
    const int64_t offset = contexts[c] - lens[c];  // cached tokens before the chunk
    for (int64_t first = 0; first < lens[c]; first += positions_per_item) {
      const int64_t cost = offset + std::min(first + positions_per_item, lens[c]);
      for (int64_t h = 0; h < kv_heads; ++h) items.push_back({c, h, first, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

}  // namespace spindle_prefill
