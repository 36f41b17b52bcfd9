// Prefill attention on AMX tiles, for bf16 caches where the CPU has AMX: the same contract as
// paged_prefill.cpp (each prompt chunk's query rows attend causally to their sequence's context,
// read in place from the head-major paged KV cache), with both products on the tile unit.
//
// A work item is (chunk, KV head, up to ITEM_ROWS query rows: positions x the query heads that
// share the KV head). It first lays out its context once, 32 keys per block: K as the B operand
// of S = Q Kᵀ (pairs of dimensions interleaved, keys as columns) and V as the B operand of
// O = P V (pairs of keys interleaved). Then each group of 16 query rows makes two passes over the
// blocks: the first takes each row's maximum score, the second recomputes the scores (cheap on
// the tile unit), turns them into probabilities exp(s - max) with that final maximum — so the
// output never needs rescaling — rounds them to bf16 as the A operand of P V and accumulates O in
// fp32 tiles. Probabilities in bf16 (as flash attention's bf16 kernels do); scores, softmax sums
// and the output accumulate in fp32.
//
// The vector kernel in paged_prefill.cpp spends ~7 instructions per (query row, key) pair on
// dot products and P·V; here those are tile instructions and what is left is the softmax's exp.
// SPINDLE_AMX_ATTENTION=0 keeps the vector kernel, to compare.
#include "amx.h"
#include "kernels.h"
#include "prefill_items.h"
#include "vec.h"

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

#if SPINDLE_AMX

using namespace spindle_vec;

constexpr int64_t KEYS = 32;         // keys per block: two C tiles of scores, one A tile of P
constexpr int64_t TILE_ROWS = 16;    // query rows per tile
constexpr int64_t ITEM_ROWS = 128;   // query rows per work item, sharing its laid-out context
constexpr int64_t TILE_ELEMS = 512;  // bf16 elements in one 1 KB tile
constexpr float MASKED = -1e30f;     // a masked score: exp() of it minus the row max is 0

bool amx_attention_enabled() {
  static const bool enabled = [] {
    const char* flag = std::getenv("SPINDLE_AMX_ATTENTION");
    return flag == nullptr || std::strcmp(flag, "0") != 0;
  }();
  return enabled;
}

using spindle_prefill::Item;

template <int64_t HEAD_DIM>
struct Scratch {
  static constexpr int64_t STEPS = HEAD_DIM / 32;      // K steps of S = Q Kᵀ
  static constexpr int64_t DIM_TILES = HEAD_DIM / 16;  // C tiles across O's columns
  static constexpr int64_t BLOCK_ELEMS = KEYS * HEAD_DIM;
  std::vector<uint16_t> keys;    // per block: [STEPS][2 key halves][16 dim pairs][16 keys][2]
  std::vector<uint16_t> values;  // per block: [DIM_TILES][16 key pairs][16 dims][2]
  std::vector<uint16_t> query = std::vector<uint16_t>(TILE_ROWS * HEAD_DIM);
  std::vector<float> scores = std::vector<float>(TILE_ROWS * KEYS);
  std::vector<uint16_t> probs = std::vector<uint16_t>(TILE_ROWS * KEYS);
  std::vector<float> out = std::vector<float>(TILE_ROWS * HEAD_DIM);
};

// Lays out keys [0, length) of one KV head in blocks of 32 (keys past `length` are zero).
template <int64_t HEAD_DIM>
void layout_context(Scratch<HEAD_DIM>& s, const uint16_t* k_head, const uint16_t* v_head,
                    const int64_t* table, int64_t block_size, int64_t length) {
  using S = Scratch<HEAD_DIM>;
  const int64_t blocks = (length + KEYS - 1) / KEYS;
  s.keys.assign(blocks * S::BLOCK_ELEMS, 0);
  s.values.assign(blocks * S::BLOCK_ELEMS, 0);
  for (int64_t key = 0; key < length; ++key) {
    const int64_t slot = table[key / block_size] * block_size + key % block_size;
    const uint16_t* k_row = k_head + slot * HEAD_DIM;
    const uint16_t* v_row = v_head + slot * HEAD_DIM;
    const int64_t t = key % KEYS;
    // K: element (step, half, pair, column, e) = K[key][step * 32 + 2 pair + e], column = t % 16
    uint32_t* k_block = reinterpret_cast<uint32_t*>(s.keys.data() + key / KEYS * S::BLOCK_ELEMS);
    const uint32_t* k_pairs = reinterpret_cast<const uint32_t*>(k_row);
    for (int64_t step = 0; step < S::STEPS; ++step)
      for (int64_t pair = 0; pair < 16; ++pair)
        k_block[((step * 2 + t / 16) * 16 + pair) * 16 + t % 16] = k_pairs[step * 16 + pair];
    // V: element (tile, key pair, dim, e) = V[2 key pair + e][tile * 16 + dim]
    uint16_t* v_block = s.values.data() + key / KEYS * S::BLOCK_ELEMS;
    for (int64_t tile = 0; tile < S::DIM_TILES; ++tile)
      for (int64_t dim = 0; dim < 16; ++dim)
        v_block[((tile * 16 + t / 2) * 16 + dim) * 2 + t % 2] = v_row[tile * 16 + dim];
  }
}

// scores[16 rows][32 keys] = (q · k) * scale for block `block`, keys past a row's position masked.
template <int64_t HEAD_DIM>
void block_scores(Scratch<HEAD_DIM>& s, int64_t block, const int32_t* positions, int64_t min_pos,
                  float scale) {
  using S = Scratch<HEAD_DIM>;
  const uint16_t* k_block = s.keys.data() + block * S::BLOCK_ELEMS;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t step = 0; step < S::STEPS; ++step) {
    _tile_loadd(4, s.query.data() + step * 32, HEAD_DIM * 2);
    _tile_loadd(6, k_block + (step * 2) * TILE_ELEMS, 64);
    _tile_loadd(7, k_block + (step * 2 + 1) * TILE_ELEMS, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
  }
  _tile_stored(0, s.scores.data(), KEYS * 4);
  _tile_stored(1, s.scores.data() + 16, KEYS * 4);
  const int64_t key0 = block * KEYS;
  const bool crosses = key0 + KEYS - 1 > min_pos;  // some key lies past some row
  const ivec lanes = (ivec){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const ivec keys_lo = lanes + static_cast<int32_t>(key0), keys_hi = keys_lo + 16;
  for (int64_t r = 0; r < TILE_ROWS; ++r) {
    float* row = s.scores.data() + r * KEYS;
    vec lo = load(row) * scale, hi = load(row + 16) * scale;
    if (crosses) {
      const ivec position = ivec{} + positions[r];
      lo = keys_lo > position ? splat(MASKED) : lo;
      hi = keys_hi > position ? splat(MASKED) : hi;
    }
    store(row, lo);
    store(row + 16, hi);
  }
}

inline float lane_max(vec v) {
  float top = v[0];
  for (int64_t l = 1; l < LANES; ++l) top = std::max(top, v[l]);
  return top;
}

inline float lane_sum(vec v) {
  float total = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) total += v[l];
  return total;
}

// One group of 16 query rows (already in s.query) over blocks [0, blocks): out rows, unnormalised
// in s.out, and each row's softmax sum.
template <int64_t HEAD_DIM>
void attend_rows(Scratch<HEAD_DIM>& s, int64_t blocks, const int32_t* positions, float scale,
                 float* sums) {
  using S = Scratch<HEAD_DIM>;
  const int64_t min_pos = *std::min_element(positions, positions + TILE_ROWS);
  vec peaks[TILE_ROWS];
  for (int64_t r = 0; r < TILE_ROWS; ++r) peaks[r] = splat(MASKED);
  for (int64_t block = 0; block < blocks; ++block) {
    block_scores(s, block, positions, min_pos, scale);
    for (int64_t r = 0; r < TILE_ROWS; ++r) {
      const float* row = s.scores.data() + r * KEYS;
      const vec lo = load(row), hi = load(row + 16);
      const vec top = lo > hi ? lo : hi;
      peaks[r] = top > peaks[r] ? top : peaks[r];
    }
  }
  vec row_max[TILE_ROWS], row_sum[TILE_ROWS];
  for (int64_t r = 0; r < TILE_ROWS; ++r) row_max[r] = splat(lane_max(peaks[r])), row_sum[r] = vec{};
  std::fill(s.out.begin(), s.out.end(), 0.0f);
  for (int64_t block = 0; block < blocks; ++block) {
    block_scores(s, block, positions, min_pos, scale);
    for (int64_t r = 0; r < TILE_ROWS; ++r) {
      const float* row = s.scores.data() + r * KEYS;
      const vec lo = exp_minus(load(row), row_max[r]), hi = exp_minus(load(row + 16), row_max[r]);
      row_sum[r] += lo + hi;
      const __m512bh pair = _mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);  // keys 0-15, 16-31
      _mm512_storeu_si512(s.probs.data() + r * KEYS, (__m512i)pair);
    }
    _tile_loadd(5, s.probs.data(), KEYS * 2);
    const uint16_t* v_block = s.values.data() + block * S::BLOCK_ELEMS;
    for (int64_t tile = 0; tile < S::DIM_TILES; ++tile) {
      _tile_loadd(2, s.out.data() + tile * 16, HEAD_DIM * 4);
      _tile_loadd(7, v_block + tile * TILE_ELEMS, 64);
      _tile_dpbf16ps(2, 5, 7);
      _tile_stored(2, s.out.data() + tile * 16, HEAD_DIM * 4);
    }
  }
  for (int64_t r = 0; r < TILE_ROWS; ++r) sums[r] = lane_sum(row_sum[r]);
}

template <int64_t HEAD_DIM>
void prefill_amx(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                 const at::Tensor& q_starts, const at::Tensor& q_lens,
                 const at::Tensor& context_lens, double scale) {
  const int64_t num_heads = q.size(1), kv_heads = k_cache.size(0);
  const int64_t num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t item_positions = std::max<int64_t>(1, ITEM_ROWS / group);
  const int64_t q_row_stride = q.stride(0), out_row_stride = out.stride(0);
  const uint16_t* q_ptr = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* k_ptr = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const uint16_t* v_ptr = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  at::BFloat16* out_ptr = out.data_ptr<at::BFloat16>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* lens = q_lens.data_ptr<int64_t>();
  const int64_t* contexts = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  const std::vector<Item> items =
      spindle_prefill::make_items(q_starts, q_lens, context_lens, kv_heads, item_positions);

  for_each_item(
      items.size(), [] { return Scratch<HEAD_DIM>(); },
      [&](Scratch<HEAD_DIM>& s, int64_t index) {
        const Item& item = items[index];
        const int64_t offset = contexts[item.chunk] - lens[item.chunk];
        const int64_t positions = std::min(item_positions, lens[item.chunk] - item.first);
        const int64_t rows = positions * group;  // row r: position r / group, head r % group
        const int64_t head_base = item.kv_head * num_blocks * block_size * HEAD_DIM;
        const int64_t first_row = starts[item.chunk] + item.first;
        const int64_t last_position = offset + item.first + positions - 1;
        layout_context(s, k_ptr + head_base, v_ptr + head_base,
                       tables + item.chunk * max_blocks, block_size, last_position + 1);
        spindle_amx::configure_tiles();
        for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
          // The group's query rows and positions; padding rows repeat the last row.
          int32_t row_positions[TILE_ROWS];
          for (int64_t r = 0; r < TILE_ROWS; ++r) {
            const int64_t row = std::min(r0 + r, rows - 1);
            row_positions[r] = static_cast<int32_t>(offset + item.first + row / group);
            std::memcpy(s.query.data() + r * HEAD_DIM,
                        q_ptr + (first_row + row / group) * q_row_stride +
                            (item.kv_head * group + row % group) * HEAD_DIM,
                        HEAD_DIM * 2);
          }
          const int64_t keys = *std::max_element(row_positions, row_positions + TILE_ROWS) + 1;
          float sums[TILE_ROWS];
          attend_rows(s, (keys + KEYS - 1) / KEYS, row_positions, fscale, sums);
          for (int64_t r = 0; r < std::min(TILE_ROWS, rows - r0); ++r) {
            const int64_t row = r0 + r;
            at::BFloat16* dst = out_ptr + (first_row + row / group) * out_row_stride +
                                (item.kv_head * group + row % group) * HEAD_DIM;
            const vec inverse = splat(1.0f / sums[r]);
            for (int64_t d = 0; d < HEAD_DIM; d += LANES)
              store(dst + d, load(s.out.data() + r * HEAD_DIM + d) * inverse);
          }
        }
        _tile_release();
      });
}

#endif  // SPINDLE_AMX

}  // namespace

bool paged_prefill_amx_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& block_tables,
                        const at::Tensor& q_starts, const at::Tensor& q_lens,
                        const at::Tensor& context_lens, double scale) {
#if SPINDLE_AMX
  const int64_t head_dim = q.size(2);
  if (q.scalar_type() != at::kBFloat16 || (head_dim != 64 && head_dim != 128) ||
      !amx_attention_enabled() || !spindle_amx::amx_permitted())
    return false;
  if (head_dim == 64)
    prefill_amx<64>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens, scale);
  else
    prefill_amx<128>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens,
                     scale);
  return true;
#else
  (void)out, (void)q, (void)k_cache, (void)v_cache, (void)block_tables, (void)q_starts;
  (void)q_lens, (void)context_lens, (void)scale;
  return false;
#endif
}
