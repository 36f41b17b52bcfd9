// Paged decode attention for the CPU: one query token per sequence against its context, read in
// place from the head-major paged KV cache ([kv_heads, blocks, block_size, head_dim]) through the
// sequence's block table. No gather, no padding: each K/V row is read once, in fp32 arithmetic.
// Work items are (sequence, KV head) pairs, taken longest-first from a shared counter; the query
// heads that share a KV head are done together so each K/V row is loaded once for all of them.
//
// Per key: its row is converted to fp32 vectors, each query head's products folded into one vector
// of partial sums; every 16 keys, `transpose_sum` turns the 16 partial vectors into one vector of
// 16 scores (no per-key horizontal sum). Softmax and the weighted sum of V rows are whole-vector
// operations. Measured (2-core EPYC, bf16, 32 sequences of 400 tokens, 9 heads / 3 KV heads, 2
// threads): 1.24 ms per layer with a horizontal sum per key before, 0.78-0.90 ms now with the
// blocks shuffled, 0.49 ms with them contiguous (memory latency: hence the prefetch). Built with
// -ffast-math: nothing here relies on infinities or NaNs; every context has at least one token.
#include "kernels.h"
#include "vec.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace spindle_vec;

constexpr int64_t MAX_GROUP = 8;  // query heads per KV head kept in registers; more loop over
                                  // groups of this many

struct Item {
  int64_t seq, kv_head, length;
};

// bf16 q.k with `vdpbf16ps` (BF16_DOT): bf16 pairs multiplied straight from the K row, where the
// generic path converts every K element to fp32 first. Halves the score pass's instructions;
// measured 7 % off the kernel (bf16, batch 32, ~280-token contexts), so that pass is not its bound.
#if defined(__AVX512BF16__)
template <int64_t HEAD_DIM>
struct Bf16Query {
  static constexpr int64_t PAIRS = HEAD_DIM / 32;  // 32 bf16 per register
  __m512bh part[PAIRS];
  void load(const at::BFloat16* q) {
    for (int64_t j = 0; j < PAIRS; ++j) part[j] = (__m512bh)_mm512_loadu_si512(q + j * 32);
  }
  // 16 lanes of partial sums whose total is q.row (transpose_sum adds the lanes up).
  vec dot(const at::BFloat16* row) const {
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), part[0],
                                  (__m512bh)_mm512_loadu_si512(row));
    for (int64_t j = 1; j < PAIRS; ++j)
      sum = _mm512_dpbf16_ps(sum, part[j], (__m512bh)_mm512_loadu_si512(row + j * 32));
    return (vec)sum;
  }
};
#endif

// A context's blocks need not be in a row (the block manager keeps them so where it can; a shared
// prefix or a full cache breaks the run), and the hardware prefetcher cannot follow a jump from
// one block to the next: each block's rows are asked for PREFETCH_BLOCKS blocks ahead of use. One
// block ahead -> four, per layer (2-core EPYC, 32 contexts of ~400 tokens, 30 layers' caches,
// bf16): shuffled blocks 0.50 -> 0.42 ms, contiguous 0.33 -> 0.32 ms (fp32 0.87 -> 0.83 and 0.62
// -> 0.53 ms). The rows go to L2 (`prefetcht1`), not L1: four blocks are 64-128 lines, more than
// L1's miss buffers hold, so L1 prefetches stalled or were dropped. Measured on a 2-core Zen 4
// (32 contexts of 378 tokens, 30 layers' caches): bf16 0.53 -> 0.37 ms a layer contiguous, 0.84 ->
// 0.51 shuffled; fp32 0.74 -> 0.72 contiguous (its DRAM bound), 1.21 -> 0.87 shuffled.
constexpr int64_t PREFETCH_BLOCKS = 4;
constexpr int PREFETCH_TO_L2 = 2;  // __builtin_prefetch locality 2: prefetcht1 on x86

template <typename T, int64_t HEAD_DIM>
inline void prefetch_block(const T* head, const int64_t* table, int64_t block_index,
                           int64_t length, int64_t block_size) {
  const int64_t first_key = block_index * block_size;
  if (first_key >= length) return;
  const char* block =
      reinterpret_cast<const char*>(head + table[block_index] * block_size * HEAD_DIM);
  const int64_t bytes = std::min(block_size, length - first_key) * HEAD_DIM * sizeof(T);
  for (int64_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(block + offset, 0, PREFETCH_TO_L2);
}

// Where a pass over a KV head's context reads: the head's cache, the block table, the length.
template <typename T>
struct Rows {
  const T* head = nullptr;  // null: nothing
  const int64_t* table = nullptr;
  int64_t length = 0;
};

// One KV head's context rows, asked for in order from key 0: `row(key)` switches blocks through
// the block table and prefetches ahead; the last blocks prefetch the first ones of `then`, the pass
// that follows (V after K; after V, the K of the item this thread likely takes next), so a pass
// does not start on blocks read on demand. Measured on the 2-core Zen 4 (32 contexts, 8 layers'
// caches, alternating in one process): fp32 13.4 -> 17.4 GB/s at 128 tokens, 12.4 -> 13.2 at 384;
// bf16 10.7 -> 13.0 and 10.5 -> 11.0 (about half of the gain from V after K).
template <typename T, int64_t HEAD_DIM>
struct ContextRows {
  Rows<T> rows;
  int64_t block_size, block_shift;
  Rows<T> then;
  const T* block = nullptr;

  const T* row(int64_t key) {
    const int64_t in_block = key & (block_size - 1);
    if (in_block == 0) {
      const int64_t index = key >> block_shift;
      block = rows.head + rows.table[index] * block_size * HEAD_DIM;
      if (index == 0)
        for (int64_t ahead = 1; ahead < PREFETCH_BLOCKS; ++ahead)
          prefetch(rows, ahead);
      const int64_t target = index + PREFETCH_BLOCKS;
      const int64_t blocks = (rows.length + block_size - 1) >> block_shift;
      if (target < blocks)
        prefetch(rows, target);
      else if (then.head)
        prefetch(then, target - blocks);
    }
    return block + in_block * HEAD_DIM;
  }
  void prefetch(const Rows<T>& of, int64_t block_index) const {
    prefetch_block<T, HEAD_DIM>(of.head, of.table, block_index, of.length, block_size);
  }
};

// One (sequence, KV head) item for query heads [g0, g0 + G) of the group. HEAD_DIM / LANES vectors
// per row. `next`: the rows read after this item's V pass (prefetched as it ends).
template <typename T, int64_t HEAD_DIM, int64_t G>
void decode_heads(const T* q_heads, const T* k_head, const T* v_head, const int64_t* table,
                  int64_t length, int64_t block_size, float scale, T* out_heads,
                  std::vector<vec>& scores, const Rows<T>& next) {
  constexpr int64_t VECS = HEAD_DIM / LANES;
  const int64_t block_shift = __builtin_ctzll(block_size);  // a power of two (checked)
  const int64_t score_vecs = (length + LANES - 1) / LANES;
  scores.resize(G * score_vecs);
  constexpr bool bf16_dot = BF16_DOT && std::is_same_v<T, at::BFloat16>;
  vec query[G][VECS];  // scaled fp32 query rows (generic path)
  if constexpr (!bf16_dot)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < VECS; ++j)
        query[g][j] = load(q_heads + g * HEAD_DIM + j * LANES) * scale;
  const vec score_scale = splat(bf16_dot ? scale : 1.0f);  // the bf16 path scales the scores
#if defined(__AVX512BF16__)
  Bf16Query<HEAD_DIM> bf16_query[G];
  if constexpr (bf16_dot)
    for (int64_t g = 0; g < G; ++g) bf16_query[g].load(q_heads + g * HEAD_DIM);
#endif

  // scores[g][t] = q_g . k_t, 16 keys per transpose_sum.
  vec partial[G][LANES];
  vec peak[G];
  for (int64_t g = 0; g < G; ++g) peak[g] = splat(-1e30f);
  const Rows<T> value_rows{v_head, table, length};
  ContextRows<T, HEAD_DIM> keys{{k_head, table, length}, block_size, block_shift, value_rows};
  for (int64_t key0 = 0; key0 < length; key0 += LANES) {
    const int64_t count = std::min(LANES, length - key0);
    for (int64_t t = 0; t < LANES; ++t) {
      if (t >= count) {
        for (int64_t g = 0; g < G; ++g) partial[g][t] = vec{};
        continue;
      }
      const T* row = keys.row(key0 + t);
#if defined(__AVX512BF16__)
      if constexpr (bf16_dot) {
        for (int64_t g = 0; g < G; ++g) partial[g][t] = bf16_query[g].dot(row);
        continue;
      }
#endif
      vec k[VECS];
      for (int64_t j = 0; j < VECS; ++j) k[j] = load(row + j * LANES);
      for (int64_t g = 0; g < G; ++g) {
        vec sum = query[g][0] * k[0];
        for (int64_t j = 1; j < VECS; ++j) sum += query[g][j] * k[j];
        partial[g][t] = sum;
      }
    }
    const ivec live = lane_indices() < static_cast<int32_t>(count);
    for (int64_t g = 0; g < G; ++g) {
      vec block = transpose_sum(partial[g]) * score_scale;
      block = live ? block : splat(-1e30f);
      scores[g * score_vecs + key0 / LANES] = block;
      peak[g] = block > peak[g] ? block : peak[g];
    }
  }
  // Softmax numerators and their sums.
  float inverse[G];
  for (int64_t g = 0; g < G; ++g) {
    float top = peak[g][0];
    for (int64_t l = 1; l < LANES; ++l) top = std::max(top, peak[g][l]);
    const vec shift = splat(top);
    vec sum{};
    for (int64_t i = 0; i < score_vecs; ++i) {
      vec& p = scores[g * score_vecs + i];
      p = exp_minus(p, shift);  // padding lanes (-1e30) become 0
      sum += p;
    }
    float total = 0.0f;
    for (int64_t l = 0; l < LANES; ++l) total += sum[l];
    inverse[g] = 1.0f / total;
  }
  // out_g = sum_t p_g[t] v_t / sum_t p_g[t]
  vec acc[G][VECS] = {};
  const float* probs = reinterpret_cast<const float*>(scores.data());
  ContextRows<T, HEAD_DIM> values{value_rows, block_size, block_shift, next};
  for (int64_t key = 0; key < length; ++key) {
    const T* row = values.row(key);
    vec v[VECS];
    for (int64_t j = 0; j < VECS; ++j) v[j] = load(row + j * LANES);
    for (int64_t g = 0; g < G; ++g) {
      const float p = probs[g * score_vecs * LANES + key];
      for (int64_t j = 0; j < VECS; ++j) acc[g][j] += p * v[j];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < VECS; ++j) {
      const vec value = acc[g][j] * inverse[g];
      for (int64_t l = 0; l < LANES; ++l)
        out_heads[g * HEAD_DIM + j * LANES + l] = static_cast<T>(value[l]);
    }
}

template <typename T, int64_t HEAD_DIM>
void decode_group(const T* q_heads, const T* k_head, const T* v_head, const int64_t* table,
                  int64_t length, int64_t block_size, float scale, T* out_heads, int64_t group,
                  std::vector<vec>& scores, const Rows<T>& next) {
  const Rows<T> again{k_head, table, length};  // the next group of query heads reads K again
  for (int64_t g0 = 0; g0 < group; g0 += MAX_GROUP) {
    const int64_t offset = g0 * HEAD_DIM;
    const auto run = [&](auto heads) {
      decode_heads<T, HEAD_DIM, decltype(heads)::value>(q_heads + offset, k_head, v_head, table,
                                                        length, block_size, scale,
                                                        out_heads + offset, scores,
                                                        g0 + MAX_GROUP < group ? again : next);
    };
    switch (std::min(MAX_GROUP, group - g0)) {
      case 1: run(std::integral_constant<int64_t, 1>{}); break;
      case 2: run(std::integral_constant<int64_t, 2>{}); break;
      case 3: run(std::integral_constant<int64_t, 3>{}); break;
      case 4: run(std::integral_constant<int64_t, 4>{}); break;
      case 5: run(std::integral_constant<int64_t, 5>{}); break;
      case 6: run(std::integral_constant<int64_t, 6>{}); break;
      case 7: run(std::integral_constant<int64_t, 7>{}); break;
      default: run(std::integral_constant<int64_t, 8>{}); break;
    }
  }
}

template <typename T, int64_t HEAD_DIM>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                   at::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1);
  const int64_t kv_heads = k_cache.size(0), num_blocks = k_cache.size(1);
  const int64_t block_size = k_cache.size(2), max_blocks = block_tables.size(1);
  const int64_t group = num_heads / kv_heads;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t q_row_stride = q.stride(0);  // q may be a view into the fused qkv rows
  const float fscale = static_cast<float>(scale);

  std::vector<Item> items;
  for (int64_t seq = 0; seq < num_seqs; ++seq)
    for (int64_t kv = 0; kv < kv_heads; ++kv) items.push_back({seq, kv, lens[seq]});
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.length > b.length; });
  const int64_t count = static_cast<int64_t>(items.size()), threads = item_threads(count);
  const int64_t head_stride = num_blocks * block_size * HEAD_DIM;  // one KV head's cache
  for_each_item(
      count, [] { return std::vector<vec>(); },
      [&](std::vector<vec>& scores, int64_t index) {
        const Item& item = items[index];
        const int64_t base = item.kv_head * head_stride;
        const int64_t head_offset = item.kv_head * group * HEAD_DIM;
        Rows<T> next;  // the K of the item this thread likely takes next (item_threads)
        if (index + threads < count) {
          const Item& after = items[index + threads];
          next = {k_ptr + after.kv_head * head_stride, tables + after.seq * max_blocks,
                  after.length};
        }
        decode_group<T, HEAD_DIM>(q_ptr + item.seq * q_row_stride + head_offset,
                                  k_ptr + base, v_ptr + base,
                                  tables + item.seq * max_blocks, item.length, block_size, fscale,
                                  out_ptr + item.seq * num_heads * HEAD_DIM + head_offset, group,
                                  scores, next);
      });
}

}  // namespace

bool paged_decode_supports(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2),
              "each query row's heads must be packed (rows may be strided)");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and context lengths must be int64");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty(q.sizes(), q.options());  // contiguous whatever q's row stride
  TORCH_CHECK(paged_decode_supports(q.size(2)), "paged_decode needs head_dim 64 or 128");
  const int64_t block_size = k_cache.size(2);
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0,
              "the block size must be a power of two");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (q.size(2) == 64)
        decode_kernel<scalar_t, 64>(q, k_cache, v_cache, tables, lens, scale, out);
      else
        decode_kernel<scalar_t, 128>(q, k_cache, v_cache, tables, lens, scale, out);
    } else {
      TORCH_CHECK(false, "float64 is not supported");
    }
  });
  return out;
}
