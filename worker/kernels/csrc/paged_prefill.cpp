// Paged prefill attention for the CPU: the prompt chunks of one step, each a run of query rows
// attending causally to its sequence's context (earlier chunks and itself), read in place from the
// head-major paged KV cache ([kv_heads, blocks, block_size, head_dim]) after the step's K/V were
// written to it. One call covers every chunk of the step.
//
// Flash-attention style, in fp32 arithmetic (with bf16 caches on AVX512_BF16 CPUs the q.k scores
// come from `vdpbf16ps`, see block_scores_bf16; softmax and P·V stay fp32). A work item is (chunk,
// KV head, tile of query positions) with 48 query rows (3 AVX-512 vectors, 6 AVX2 ones): the
// tile's positions times the query heads sharing the KV head, so each K/V block is converted once
// for all of them. The rows run along vector lanes, so per cache block (16
// keys) the scores (register-blocked: KEY_BLOCK keys x ROW_VECS row vectors), causal mask, online
// softmax (running max and sum) and O += P·V are whole-vector operations with no horizontal
// reductions. Items are taken longest-first from a shared counter so the threads finish together
// despite the causal triangle. Built with -ffast-math: masked scores are a large negative number,
// never -inf. The vector type is GCC's generic one (vec.h), so the code vectorises for AVX-512,
// AVX2 or SSE.
#include "kernels.h"
#include "prefill_items.h"
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

constexpr int64_t ROWS = 48;  // query rows per work item: ROW_VECS vectors of LANES
constexpr int64_t ROW_VECS = ROWS / LANES;
// Register blocking: keys sharing each loaded query column, and value dimensions accumulated in
// registers at a time — KEY_BLOCK x ROW_VECS accumulators, 24 of AVX-512's 32 registers or 12 of
// AVX2's 16.
constexpr int64_t ACCUMULATORS = LANES == 16 ? 24 : 12;
constexpr int64_t KEY_BLOCK = ACCUMULATORS / ROW_VECS;  // 8 (AVX-512) or 2 (AVX2)
constexpr int64_t DIM_BLOCK = KEY_BLOCK;
static_assert(KEY_BLOCK >= 1 && ROWS % LANES == 0);
constexpr float MASKED = -1e30f;  // a masked score: exp() of it minus any real max is 0

using spindle_prefill::Item;

// Per-thread buffers. Query rows run along vector lanes ("transposed"): row r of the item is
// lane r % LANES of vector r / LANES, so the softmax of 16 rows is one vector operation.
template <int64_t HEAD_DIM>
struct Scratch {
  std::vector<vec> query;   // [HEAD_DIM][ROW_VECS]: scaled q, transposed
  std::vector<vec> acc;     // [HEAD_DIM][ROW_VECS]: unnormalised output, transposed
  std::vector<vec> probs;   // [block][ROW_VECS]: scores, then probabilities, transposed
  std::vector<float> keys;  // [block][HEAD_DIM] fp32
  std::vector<float> values;
  std::vector<uint32_t> query_pairs;  // [HEAD_DIM / 2][ROWS]: unscaled bf16 pairs (bf16 path)
  explicit Scratch(int64_t block)
      : query(HEAD_DIM * ROW_VECS), acc(HEAD_DIM * ROW_VECS), probs(block * ROW_VECS),
        keys(block * HEAD_DIM), values(block * HEAD_DIM), query_pairs(HEAD_DIM / 2 * ROWS) {}
};

// A block's first `rows` K or V rows as fp32: converted into `scratch`, or in place for fp32.
template <typename T, int64_t HEAD_DIM>
inline const float* rows_as_float(const T* src, std::vector<float>& scratch, int64_t rows) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    float* dst = scratch.data();
#pragma omp simd
    for (int64_t i = 0; i < rows * HEAD_DIM; ++i) dst[i] = to_float(src[i]);
    return dst;
  }
}

// probs[t][v] = sum_d keys[t][d] * query[d][v], for the block's first `valid` keys (fp32 rows).
template <int64_t HEAD_DIM>
inline void block_scores(Scratch<HEAD_DIM>& s, const float* keys, int64_t valid) {
  int64_t t0 = 0;
  for (; t0 + KEY_BLOCK <= valid; t0 += KEY_BLOCK) {
    vec a[KEY_BLOCK][ROW_VECS] = {};
    for (int64_t d = 0; d < HEAD_DIM; ++d) {
      const vec* q = s.query.data() + d * ROW_VECS;
      for (int64_t i = 0; i < KEY_BLOCK; ++i) {
        const float k = keys[(t0 + i) * HEAD_DIM + d];
        for (int64_t v = 0; v < ROW_VECS; ++v) a[i][v] += k * q[v];
      }
    }
    for (int64_t i = 0; i < KEY_BLOCK; ++i)
      for (int64_t v = 0; v < ROW_VECS; ++v) s.probs[(t0 + i) * ROW_VECS + v] = a[i][v];
  }
  for (; t0 < valid; ++t0) {
    vec a[ROW_VECS] = {};
    for (int64_t d = 0; d < HEAD_DIM; ++d) {
      const float k = keys[t0 * HEAD_DIM + d];
      for (int64_t v = 0; v < ROW_VECS; ++v) a[v] += k * s.query[d * ROW_VECS + v];
    }
    for (int64_t v = 0; v < ROW_VECS; ++v) s.probs[t0 * ROW_VECS + v] = a[v];
  }
}

#if defined(__AVX512BF16__)
// block_scores for bf16 caches with AVX512_BF16: `vdpbf16ps` multiplies pairs of dimensions of
// the bf16 query rows (lanes) by a broadcast pair of the key row, read straight from the cache
// (no fp32 copy of K); products of two bf16 are exact in fp32. The scale is applied to the
// scores. Halves the score loop's instructions.
template <int64_t HEAD_DIM>
inline void block_scores_bf16(Scratch<HEAD_DIM>& s, const at::BFloat16* keys, int64_t valid,
                              float scale) {
  constexpr int64_t PAIRS = HEAD_DIM / 2;
  const uint32_t* key_pairs = reinterpret_cast<const uint32_t*>(keys);
  const uint32_t* query = s.query_pairs.data();
  const __m512 factor = _mm512_set1_ps(scale);
  const auto score_keys = [&](int64_t t0, auto count) {
    constexpr int64_t KEYS = decltype(count)::value;
    __m512 a[KEYS][ROW_VECS];
    for (int64_t i = 0; i < KEYS; ++i)
      for (int64_t v = 0; v < ROW_VECS; ++v) a[i][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < PAIRS; ++p) {
      __m512bh q[ROW_VECS];
      for (int64_t v = 0; v < ROW_VECS; ++v)
        q[v] = (__m512bh)_mm512_loadu_si512(query + (p * ROW_VECS + v) * LANES);
      for (int64_t i = 0; i < KEYS; ++i) {
        const __m512bh k = (__m512bh)_mm512_set1_epi32(key_pairs[(t0 + i) * PAIRS + p]);
        for (int64_t v = 0; v < ROW_VECS; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], q[v], k);
      }
    }
    for (int64_t i = 0; i < KEYS; ++i)
      for (int64_t v = 0; v < ROW_VECS; ++v)
        s.probs[(t0 + i) * ROW_VECS + v] = (vec)_mm512_mul_ps(a[i][v], factor);
  };
  int64_t t0 = 0;
  for (; t0 + KEY_BLOCK <= valid; t0 += KEY_BLOCK)
    score_keys(t0, std::integral_constant<int64_t, KEY_BLOCK>{});
  for (; t0 < valid; ++t0) score_keys(t0, std::integral_constant<int64_t, 1>{});
}
#endif

// acc[d][v] += sum_t probs[t][v] * values[t][d] (fp32 rows).
template <int64_t HEAD_DIM>
inline void block_values(Scratch<HEAD_DIM>& s, const float* values, int64_t valid) {
  for (int64_t d0 = 0; d0 < HEAD_DIM; d0 += DIM_BLOCK) {
    vec o[DIM_BLOCK][ROW_VECS];
    for (int64_t j = 0; j < DIM_BLOCK; ++j)
      for (int64_t v = 0; v < ROW_VECS; ++v) o[j][v] = s.acc[(d0 + j) * ROW_VECS + v];
    for (int64_t t = 0; t < valid; ++t) {
      const vec* p = s.probs.data() + t * ROW_VECS;
      const float* value = values + t * HEAD_DIM + d0;
      for (int64_t j = 0; j < DIM_BLOCK; ++j)
        for (int64_t v = 0; v < ROW_VECS; ++v) o[j][v] += value[j] * p[v];
    }
    for (int64_t j = 0; j < DIM_BLOCK; ++j)
      for (int64_t v = 0; v < ROW_VECS; ++v) s.acc[(d0 + j) * ROW_VECS + v] = o[j][v];
  }
}

template <typename T, int64_t HEAD_DIM>
void prefill_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& block_tables,
                    const at::Tensor& q_starts, const at::Tensor& q_lens,
                    const at::Tensor& context_lens, double scale) {
  const int64_t num_heads = q.size(1), kv_heads = k_cache.size(0);
  const int64_t num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t tile_positions = std::max<int64_t>(1, ROWS / group);
  const int64_t q_row_stride = q.stride(0), out_row_stride = out.stride(0);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* lens = q_lens.data_ptr<int64_t>();
  const int64_t* contexts = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  constexpr bool bf16_dot = BF16_DOT && std::is_same_v<T, at::BFloat16>;

  const std::vector<Item> items =
      spindle_prefill::make_items(q_starts, q_lens, context_lens, kv_heads, tile_positions);

  const auto make_scratch = [block_size] { return Scratch<HEAD_DIM>(block_size); };
  for_each_item(items.size(), make_scratch, [&](Scratch<HEAD_DIM>& s, int64_t index) {
    const Item& item = items[index];
    const int64_t offset = contexts[item.chunk] - lens[item.chunk];
    const int64_t positions = std::min(tile_positions, lens[item.chunk] - item.first);
    const int64_t rows = positions * group;  // row r: position r / group, head r % group
    const int64_t* table = tables + item.chunk * max_blocks;
    const int64_t head_base = item.kv_head * num_blocks * block_size * HEAD_DIM;
    const int64_t first_row = starts[item.chunk] + item.first;

    // Ask for all of the tile's query rows first: the transpose below stores each row's elements
    // one by one, which fills the store buffer and stalls the next row's loads, so without this
    // the rows came from memory one after another (perf: a quarter of the kernel at those loads).
    for (int64_t p = 0; p < positions; ++p) {
      const char* row = reinterpret_cast<const char*>(
          q_ptr + (first_row + p) * q_row_stride + item.kv_head * group * HEAD_DIM);
      for (int64_t offset = 0; offset < group * HEAD_DIM * int64_t(sizeof(T)); offset += 64)
        __builtin_prefetch(row + offset);
    }
    // Transposed, scaled queries and each row's position; padding rows repeat the last row.
    alignas(64) int32_t position_lanes[ROWS];
    float* query = reinterpret_cast<float*>(s.query.data());
    for (int64_t r = 0; r < ROWS; ++r) {
      const int64_t row = std::min(r, rows - 1);
      position_lanes[r] = static_cast<int32_t>(offset + item.first + row / group);
      const T* src = q_ptr + (first_row + row / group) * q_row_stride +
                     (item.kv_head * group + row % group) * HEAD_DIM;
      if constexpr (bf16_dot) {
        const uint32_t* pairs = reinterpret_cast<const uint32_t*>(src);
        for (int64_t p = 0; p < HEAD_DIM / 2; ++p)
          s.query_pairs[(p * ROW_VECS + r / LANES) * LANES + r % LANES] = pairs[p];
      } else {
        for (int64_t d = 0; d < HEAD_DIM; ++d)
          query[(d * ROW_VECS + r / LANES) * LANES + r % LANES] = to_float(src[d]) * fscale;
      }
    }
    ivec position[ROW_VECS];
    std::memcpy(position, position_lanes, sizeof(position));
    std::fill(s.acc.begin(), s.acc.end(), vec{});
    vec row_max[ROW_VECS], row_sum[ROW_VECS];
    for (int64_t v = 0; v < ROW_VECS; ++v) row_max[v] = splat(MASKED), row_sum[v] = vec{};

    const int64_t first_position = offset + item.first;
    const int64_t last_position = first_position + positions - 1;
    for (int64_t key0 = 0; key0 <= last_position; key0 += block_size) {
      const int64_t valid = std::min(block_size, last_position + 1 - key0);
      const int64_t block = table[key0 / block_size] * block_size * HEAD_DIM;
      const float* values = rows_as_float<T, HEAD_DIM>(v_ptr + head_base + block, s.values, valid);
#if defined(__AVX512BF16__)
      if constexpr (bf16_dot) {
        block_scores_bf16(s, k_ptr + head_base + block, valid, fscale);
      } else
#endif
      {
        block_scores(s, rows_as_float<T, HEAD_DIM>(k_ptr + head_base + block, s.keys, valid), valid);
      }
      if (key0 + valid - 1 > first_position) {  // the block reaches past some row: mask
        for (int64_t t = 0; t < valid; ++t)
          for (int64_t v = 0; v < ROW_VECS; ++v) {
            vec& score = s.probs[t * ROW_VECS + v];
            score = position[v] >= static_cast<int32_t>(key0 + t) ? score : splat(MASKED);
          }
      }
      // Online softmax, 16 rows per vector operation.
      for (int64_t v = 0; v < ROW_VECS; ++v) {
        vec peak = row_max[v];
        for (int64_t t = 0; t < valid; ++t) {
          const vec score = s.probs[t * ROW_VECS + v];
          peak = score > peak ? score : peak;
        }
        const vec correction = exp_minus(row_max[v], peak);
        vec sum{};
        for (int64_t t = 0; t < valid; ++t) {
          vec& p = s.probs[t * ROW_VECS + v];
          p = exp_minus(p, peak);
          sum += p;
        }
        row_max[v] = peak;
        row_sum[v] = row_sum[v] * correction + sum;
        for (int64_t d = 0; d < HEAD_DIM; ++d) s.acc[d * ROW_VECS + v] *= correction;
      }
      block_values(s, values, valid);
    }
    const float* acc = reinterpret_cast<const float*>(s.acc.data());
    alignas(64) float sums[ROWS];
    std::memcpy(sums, row_sum, sizeof(sums));
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out_ptr + (first_row + r / group) * out_row_stride +
               (item.kv_head * group + r % group) * HEAD_DIM;
      const float inverse = 1.0f / sums[r];
      for (int64_t d = 0; d < HEAD_DIM; ++d)
        dst[d] = static_cast<T>(acc[(d * ROW_VECS + r / LANES) * LANES + r % LANES] * inverse);
    }
  });
}

}  // namespace

bool paged_prefill_supports(int64_t head_dim, int64_t group) {
  return (head_dim == 64 || head_dim == 128) && group <= ROWS;
}

void paged_prefill_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& block_tables,
                    const at::Tensor& q_starts, const at::Tensor& q_lens,
                    const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "bad ranks");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.stride(2) == 1 &&
                  out.stride(1) == out.size(2),
              "q and out rows must hold their heads contiguously");
  TORCH_CHECK(q.sizes() == out.sizes() && q.scalar_type() == out.scalar_type(),
              "out must match q");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(paged_prefill_supports(q.size(2), q.size(1) / k_cache.size(0)),
              "paged_prefill_ needs head_dim 64 or 128 and at most 48 query heads per KV head");
  for (const auto* index : {&block_tables, &q_starts, &q_lens, &context_lens})
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous(),
                "indices must be contiguous int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q_starts.size(0) &&
                  q_lens.size(0) == q_starts.size(0) && context_lens.size(0) == q_starts.size(0),
              "one block table, start, length and context length per chunk");
  if (paged_prefill_amx_(out, q, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens,
                         scale))
    return;  // bf16 on AMX tiles (paged_prefill_amx.cpp)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (q.size(2) == 64)
        prefill_kernel<scalar_t, 64>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens,
                                     context_lens, scale);
      else
        prefill_kernel<scalar_t, 128>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens,
                                      context_lens, scale);
    } else {
      TORCH_CHECK(false, "float64 is not supported");
    }
  });
}
