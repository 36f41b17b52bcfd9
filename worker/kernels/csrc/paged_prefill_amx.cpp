// Prefill attention on AMX tiles, for bf16 caches where the CPU has AMX: the same contract as
// paged_prefill.cpp (each prompt chunk's query rows attend causally to their sequence's context,
// read in place from the head-major paged KV cache), with both products on the tile unit.
//
// A work item is (chunk, KV head, up to ITEM_ROWS query rows: positions x the query heads that
// share the KV head). It first lays out its context once, 32 keys per block: K as the B operand
// of S = Q Kᵀ (pairs of dimensions interleaved, keys as columns) and V as the B operand of
// O = P V (pairs of keys interleaved). Then each group of 16 query rows computes all of its scores
// (the query's A tiles loaded once, [16 rows x context] fp32 in scratch), scales and masks them,
// turns them into probabilities exp(s - row max) — the final maximum, so the output never needs
// rescaling — rounded to bf16 as the A operand of P V, and accumulates O in C tiles held across
// every block, stored once. Probabilities in bf16 (as flash attention's bf16 kernels do); scores,
// softmax sums and the output accumulate in fp32. (A first version computed the scores twice —
// one pass for the maxima — and loaded and stored O's tiles at every block, with items of 128
// rows laying out the same context again and again: mixed-32's bf16 prompt steps on a 2-core
// Sapphire-Rapids-class Xeon spent 2.7 ms a layer here, now 1.8.)
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
constexpr int64_t ITEM_ROWS = 512;   // query rows per work item, sharing its laid-out context
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
  std::vector<float> scores;     // [16 rows][blocks x 32 keys]: the group's scores
  std::vector<uint16_t> probs;   // [16 rows][blocks x 32 keys]: their probabilities in bf16
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

// Loads the group's query rows (s.query) as the A tiles of S = Q Kᵀ: tmm2.. one per 32 dims.
template <int64_t HEAD_DIM>
void load_query_tiles(const Scratch<HEAD_DIM>& s) {
  constexpr int64_t ld = HEAD_DIM * 2;
  _tile_loadd(2, s.query.data(), ld);
  _tile_loadd(3, s.query.data() + 32, ld);
  if constexpr (HEAD_DIM == 128) {
    _tile_loadd(4, s.query.data() + 64, ld);
    _tile_loadd(5, s.query.data() + 96, ld);
  }
}

// K step STEP (32 dims) of a block's scores: query tile QUERY (tmm2-5, from load_query_tiles)
// times the step's two key tiles, into C tiles 0 (keys 0-15) and 1 (keys 16-31). A macro, not a
// function: GCC's AMX intrinsics paste the tile numbers into the asm, so they must be literals.
#define SCORE_STEP(K_BLOCK, STEP, QUERY)                              \
  do {                                                                \
    _tile_loadd(6, (K_BLOCK) + (2 * (STEP)) * TILE_ELEMS, 64);        \
    _tile_loadd(7, (K_BLOCK) + (2 * (STEP) + 1) * TILE_ELEMS, 64);    \
    _tile_dpbf16ps(0, QUERY, 6);                                      \
    _tile_dpbf16ps(1, QUERY, 7);                                      \
  } while (0)

// s.scores[16 rows][blocks x 32 keys] = q · k, unscaled, for every block: two C tiles per block,
// the query's A tiles loaded once (load_query_tiles), the keys' B tiles streamed.
template <int64_t HEAD_DIM>
void all_scores(Scratch<HEAD_DIM>& s, int64_t blocks) {
  using S = Scratch<HEAD_DIM>;
  const int64_t ld = blocks * KEYS * 4;
  load_query_tiles(s);
  for (int64_t block = 0; block < blocks; ++block) {
    const uint16_t* k = s.keys.data() + block * S::BLOCK_ELEMS;
    _tile_zero(0);
    _tile_zero(1);
    SCORE_STEP(k, 0, 2);
    SCORE_STEP(k, 1, 3);
    if constexpr (HEAD_DIM == 128) {
      SCORE_STEP(k, 2, 4);
      SCORE_STEP(k, 3, 5);
    }
    char* dst = reinterpret_cast<char*>(s.scores.data() + block * KEYS);
    _tile_stored(0, dst, ld);
    _tile_stored(1, dst + 64, ld);
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

// Row r's scores scaled and masked past its position, then exp(score - row max) rounded to bf16
// into s.probs (the A operand of P V); returns the row's softmax sum (of the fp32
// probabilities, as before rounding).
template <int64_t HEAD_DIM>
float row_probabilities(Scratch<HEAD_DIM>& s, int64_t r, int64_t blocks, int32_t position,
                        float scale) {
  const int64_t width = blocks * KEYS;
  float* row = s.scores.data() + r * width;
  const ivec lanes = lane_indices();
  const ivec limit = ivec{} + position;
  const int64_t unmasked = (position + 1) / LANES * LANES;  // vectors wholly at or before it
  vec peak = splat(MASKED);
  for (int64_t j = 0; j < width; j += LANES) {
    vec score = load(row + j) * scale;
    if (j >= unmasked) score = lanes + static_cast<int32_t>(j) > limit ? splat(MASKED) : score;
    store(row + j, score);
    peak = score > peak ? score : peak;
  }
  const vec top = splat(lane_max(peak));
  vec sum{};
  uint16_t* probs = s.probs.data() + r * width;
  for (int64_t j = 0; j < width; j += 2 * LANES) {
    const vec lo = exp_minus(load(row + j), top), hi = exp_minus(load(row + j + LANES), top);
    sum += lo + hi;
    _mm512_storeu_si512(probs + j, (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo));
  }
  return lane_sum(sum);
}

// s.out[16 rows][dims first..first + 63] = P V over every block, accumulated in four C tiles.
template <int64_t HEAD_DIM>
void values_quarter(Scratch<HEAD_DIM>& s, int64_t blocks, int64_t first_tile) {
  using S = Scratch<HEAD_DIM>;
  const int64_t ld = blocks * KEYS * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t block = 0; block < blocks; ++block) {
    const uint16_t* v = s.values.data() + block * S::BLOCK_ELEMS + first_tile * TILE_ELEMS;
    _tile_loadd(4, s.probs.data() + block * KEYS, ld);
    _tile_loadd(5, v, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, v + TILE_ELEMS, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, v + 2 * TILE_ELEMS, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, v + 3 * TILE_ELEMS, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  float* out = s.out.data() + first_tile * 16;
  _tile_stored(0, out, HEAD_DIM * 4);
  _tile_stored(1, out + 16, HEAD_DIM * 4);
  _tile_stored(2, out + 32, HEAD_DIM * 4);
  _tile_stored(3, out + 48, HEAD_DIM * 4);
}

// One group of 16 query rows (already in s.query) over blocks [0, blocks): out rows, unnormalised
// in s.out, and each row's softmax sum. All of the rows' scores first (so each row's maximum is
// known before any probability: the output never needs rescaling), then P V with the output held
// in tiles.
template <int64_t HEAD_DIM>
void attend_rows(Scratch<HEAD_DIM>& s, int64_t blocks, const int32_t* positions, float scale,
                 float* sums) {
  s.scores.resize(TILE_ROWS * blocks * KEYS);
  s.probs.resize(TILE_ROWS * blocks * KEYS);
  all_scores(s, blocks);
  for (int64_t r = 0; r < TILE_ROWS; ++r)
    sums[r] = row_probabilities(s, r, blocks, positions[r], scale);
  for (int64_t tile = 0; tile < Scratch<HEAD_DIM>::DIM_TILES; tile += 4)
    values_quarter(s, blocks, tile);
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
