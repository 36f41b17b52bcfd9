// What the linear kernels (linear_amx.cpp, linear_bf16.cpp, linear_f32.cpp) do around their
// product: x's leading dims flattened into a contiguous [m, k] matrix, the [m, n] output and the
// shape it is returned in, the bias (if any) as fp32 for the epilogue, the gate|up weight's
// column blocks interleaved for the fused SiLU-and-multiply kernels, and the items the product
// splits into on the kernels' thread pool (pool.h).
#pragma once

#include "pool.h"

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace spindle_linear {

struct LinearCall {
  at::Tensor rows;                 // [m, k], contiguous
  at::Tensor out;                  // [m, n], x's dtype
  std::vector<int64_t> out_shape;  // x's leading dims, then n
  at::Tensor bias;                 // [n] fp32, or undefined

  int64_t m() const { return rows.size(0); }
  const float* bias_data() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }
  at::Tensor result() const { return out.view(out_shape); }
};

inline LinearCall prepare(const at::Tensor& x, int64_t k, int64_t n,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features, the weight ", k);
  LinearCall call;
  call.rows = x.reshape({-1, k}).contiguous();
  call.out = at::empty({call.rows.size(0), n}, x.options());
  call.out_shape.assign(x.sizes().begin(), x.sizes().end());
  call.out_shape.back() = n;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bias has ", bias->numel(), " values, the output ", n);
    call.bias = bias->to(at::kFloat).contiguous();
  }
  return call;
}

// A [2 x intermediate, in] gate|up weight with its `block`-column blocks alternating: block 2j =
// gate columns [block j, block j + block), 2j + 1 = up's (GateUpParallelLinear.matmul undoes it).
inline at::Tensor interleave_gate_up(const at::Tensor& weight, int64_t block) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % (2 * block) == 0,
              "a [2 x intermediate, in] gate|up weight, intermediate a multiple of ", block);
  const int64_t n = weight.size(0), k = weight.size(1);
  return weight.view({2, n / 2 / block, block, k}).transpose(0, 1).reshape({n, k});
}

// A linear product's speculative items (pool.h): a run of column blocks over a chunk of rows,
// chunk-major so a chunk of x stays cached while the column blocks pass over it, about
// RUNS_PER_THREAD runs per thread so the items a late thread holds are short. An item computes
// into its thread's scratch ([rows][blocks x block columns], the output's dtype) and `store`s
// that into the output once, if no other thread stored it first.
struct BlockItems {
  static constexpr int64_t RUNS_PER_THREAD = 8;
  int64_t m, blocks, chunk_rows, block_cols, run, runs;

  BlockItems(int64_t m, int64_t blocks, int64_t chunk_rows, int64_t block_cols)
      : m(m), blocks(blocks), chunk_rows(chunk_rows), block_cols(block_cols) {
    const int64_t threads = spindle_pool::max_threads();
    const int64_t wanted_runs = threads * RUNS_PER_THREAD;
    run = std::max<int64_t>(1, (blocks + wanted_runs - 1) / wanted_runs);
    runs = (blocks + run - 1) / run;
  }
  int64_t count() const { return (m + chunk_rows - 1) / chunk_rows * runs; }

  struct Item {
    int64_t row, rows, block, blocks;
  };
  Item operator[](int64_t index) const {
    const int64_t row = index / runs * chunk_rows, block = index % runs * run;
    return {row, std::min(chunk_rows, m - row), block, std::min(run, blocks - block)};
  }

  // This thread's scratch for one item, in T; ld = run x block_cols.
  template <typename T>
  T* scratch() const {
    struct alignas(64) Line {
      unsigned char bytes[64];
    };
    thread_local std::vector<Line> lines;
    const size_t bytes = sizeof(T) * chunk_rows * run * block_cols;
    if (lines.size() * sizeof(Line) < bytes)
      lines.resize((bytes + sizeof(Line) - 1) / sizeof(Line));
    return reinterpret_cast<T*>(lines.data());
  }
  int64_t ld() const { return run * block_cols; }

  // The first column block of the item the thread that took item `index` will likely take next
  // (the pool hands items out in order, so about `threads` later), or -1 for none: an item's
  // last block prefetches it, so a thread's weight stream runs on from one item into the next
  // instead of starting each item with a block read on demand.
  int64_t next_block_after(int64_t index) const {
    const int64_t later = index + spindle_pool::max_threads();
    return later < count() ? (*this)[later].block : -1;
  }

  // The item's rows from scratch into the [m, n] output, unless another thread stored them.
  template <typename T>
  void store(const Item& item, const T* scratch, T* out, int64_t n) const {
    spindle_pool::commit([&] {
      const size_t row_bytes = sizeof(T) * item.blocks * block_cols;
      T* first = out + item.row * n + item.block * block_cols;
      for (int64_t r = 0; r < item.rows; ++r)
        std::memcpy(first + r * n, scratch + r * ld(), row_bytes);
    });
  }
};

// An item's tiles: each column block of its run over its rows, up to ROWS rows at a time (r
// counts from the item's first row). `tile(nb, r, live, next)`: `next` is the block to prefetch
// on this pass — the run's next block or, after its last, the block this thread's next item
// likely starts with — else -1. While a block takes at most REASK_PASSES passes (a decode's few
// rows: the product streams its weights) every pass asks for the next block, catching what an
// earlier ask lost; with more rows (a prompt's: the product is bound by its arithmetic) only the
// first pass asks, the rest would only take load slots. Measured on a 2-core Zen 3, AVX2, one
// layer's four products, 2 threads, the two ways alternating: fp32 at 2,048 rows 182 GFLOP/s
// asking on the first pass against 162 on every one (best of 12; medians 152 / 146), 256 rows
// 163 / 154, 32 rows 132 / 132; 8-16 rows 2-8 % the other way (bf16 alike: 2,048 rows 150 / 142,
// 8 rows 105 / 112). mixed-32 in process, 3 alternating pairs: fp32 (which asked on every pass)
// 150.8 -> 148.9 tok/s, TTFT p99 15.2 -> 14.9 s; bf16 (which asked on the first) 147.0 -> 158.4.
// On a Zen 4's AVX-512 tiles (fp32 8 rows, bf16 12) the rule, the first pass only and every pass
// read alike at 32, 256 and 2,048 rows (fp32 at 32 rows 185 / 184 / 175 GFLOP/s, medians of 3
// rotating rounds, within the ±7 % one build reads from process to process): no loss there.
constexpr int64_t REASK_PASSES = 4;

template <int64_t ROWS, typename Tile>
void for_each_tile(const BlockItems& items, int64_t index, Tile tile) {
  const auto item = items[index];
  const int64_t last = item.block + item.blocks;
  const bool every_pass = item.rows <= REASK_PASSES * ROWS;
  for (int64_t nb = item.block; nb < last; ++nb) {
    const int64_t next = nb + 1 < last ? nb + 1 : items.next_block_after(index);
    for (int64_t r = 0; r < item.rows; r += ROWS)
      tile(nb, r, std::min<int64_t>(ROWS, item.rows - r), r == 0 || every_pass ? next : -1);
  }
}

}  // namespace spindle_linear
