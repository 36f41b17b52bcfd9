// bf16 linear layers (y = x Wᵀ + b): the packed layout both bf16 kernels read, and the product with
// AVX512_BF16 dot products (`vdpbf16ps`) for CPUs that have those but no AMX tiles (AMD Zen 4/5,
// Intel Cooper Lake); linear_amx.cpp multiplies the same layout on AMX tiles.
//
// Layout: one contiguous run per 32 output columns, [N/32][K/32][2][16][16][2] — per 32x32 block,
// two halves of 16 columns, each 16 K pairs x 16 columns x 2 (an AMX B tile, VNNI order). One
// 64-byte row of a half is what `vdpbf16ps` multiplies: 16 columns x one K pair.
//
// The product mirrors linear_f32.cpp: each item (linear_call.h's BlockItems: a run of column blocks
// over up to M_CHUNK rows, computed speculatively on the kernels' pool, pool.h) multiplies up to
// ROWS rows of x at a time into 2 x ROWS fp32 accumulators (the K pair of x broadcast, two weight
// vectors per pair); the first pass over a block prefetches the run's next block (after the run's
// last, the block the thread's next item likely starts with), and the item's rows pass over each
// block while it is cached. Each output is the fp32 sum plus the bias, rounded
// to bf16 once, as oneDNN and the AMX kernel round; the gated variant applies SiLU(gate) * up as
// the unfused layers round.
#include "kernels.h"
#include "linear_bf16.h"
#include "linear_call.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512BF16__)
#define SPINDLE_DPBF16 1
#include <immintrin.h>
#endif

namespace {

using spindle_bf16::BLOCK;
using spindle_bf16::BLOCK_BYTES;

constexpr int ROWS = 12;          // rows of x per register tile (24 accumulators)
constexpr int64_t M_CHUNK = 256;  // rows that pass over a column block while it is cached

#if SPINDLE_DPBF16

// Rows [0, R) of x (bf16, `ldx` elements apart) times one packed block over all of K, as fp32
// rows of 32 in `c`; `next` (the next block, or null) is prefetched into L2 on the way.
template <int R>
void multiply_tile(const uint16_t* x, int64_t ldx, const char* block, const char* next,
                   int64_t k_steps, float (*c)[BLOCK]) {
  // GCC (12) keeps the accumulators in registers only with every loop over rows unrolled and the
  // pair loop rolled; otherwise it stores all of them to the stack after every product.
  __m512 lo[R], hi[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t step = 0; step < k_steps; ++step) {
    const char* b = block + step * BLOCK_BYTES;
    if (next)
      for (int64_t line = 0; line < BLOCK_BYTES; line += 64)
        _mm_prefetch(next + step * BLOCK_BYTES + line, _MM_HINT_T1);
    const uint16_t* x_step = x + step * BLOCK;
#pragma GCC unroll 1
    for (int pair = 0; pair < 16; ++pair) {
      const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(b + pair * 64);
      const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(b + 1024 + pair * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t x_pair;
        std::memcpy(&x_pair, x_step + r * ldx + 2 * pair, sizeof(x_pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(x_pair);
        lo[r] = _mm512_dpbf16_ps(lo[r], xv, w_lo);
        hi[r] = _mm512_dpbf16_ps(hi[r], xv, w_hi);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(&c[r][0], lo[r]);
    _mm512_store_ps(&c[r][16], hi[r]);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const char*, const char*, int64_t,
                        float (*)[BLOCK]);

template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&multiply_tile<R + 1>...};
}

const std::array<TileFn, ROWS> TILES = tile_table(std::make_integer_sequence<int, ROWS>{});  // [rows - 1]

// An item's tiles (linear_call.h's BlockItems): each column block of its run over its rows, up to
// ROWS rows at a time (r counts from the item's first row). `tile(nb, r, live, next)`: `next` is
// the block to prefetch on this pass — on a block's first pass, the run's next block or, after
// its last, the block this thread's next item likely starts with — else -1.
template <typename Tile>
void for_each_tile(const spindle_linear::BlockItems& items, int64_t index, Tile tile) {
  const auto item = items[index];
  const int64_t last = item.block + item.blocks;
  for (int64_t nb = item.block; nb < last; ++nb)
    for (int64_t r = 0; r < item.rows; r += ROWS)
      tile(nb, r, std::min<int64_t>(ROWS, item.rows - r),
           r != 0 ? -1 : nb + 1 < last ? nb + 1 : items.next_block_after(index));
}

#endif  // SPINDLE_DPBF16

}  // namespace

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "a 2-d bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % BLOCK == 0 && k % BLOCK == 0, "weight dims must be multiples of 32");
  // [N/32][K/32][half][K pair][column][2] = W[nb*32 + half*16 + column][kb*32 + 2*pair + i]
  return weight.contiguous()
      .view({n / BLOCK, 2, 16, k / BLOCK, 16, 2})
      .permute({0, 3, 1, 4, 2, 5})
      .contiguous();
}

at::Tensor pack_linear_bf16_gated(const at::Tensor& weight) {
  return pack_linear_bf16(spindle_linear::interleave_gate_up(weight, BLOCK));
}

bool linear_dpbf16_supported(int64_t out_features, int64_t in_features) {
#if SPINDLE_DPBF16
  return out_features % BLOCK == 0 && in_features % BLOCK == 0;
#else
  (void)out_features;
  (void)in_features;
  return false;
#endif
}

at::Tensor linear_dpbf16(const at::Tensor& x, const at::Tensor& packed,
                         const c10::optional<at::Tensor>& bias) {
#if SPINDLE_DPBF16
  spindle_bf16::check_packed(x, packed, "linear_dpbf16", false);
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, bias);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const float* bias_ptr = call.bias_data();
  const uint16_t* a = reinterpret_cast<const uint16_t*>(call.rows.data_ptr<at::BFloat16>());
  const char* w = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  const spindle_linear::BlockItems items(m, n / BLOCK, M_CHUNK, BLOCK);
  spindle_pool::run_speculative(
      items.count(), {call.rows, packed, call.out, call.bias}, [=](int64_t index) {
        const auto item = items[index];
        at::BFloat16* scratch = items.scratch<at::BFloat16>();
        alignas(64) float c[ROWS][BLOCK];
        for_each_tile(items, index, [&](int64_t nb, int64_t r, int64_t live, int64_t next_nb) {
          const char* block = w + nb * block_bytes;
          const char* next = next_nb >= 0 ? w + next_nb * block_bytes : nullptr;
          TILES[live - 1](a + (item.row + r) * k, k, block, next, k_steps, c);
          spindle_bf16::store_block(scratch + r * items.ld() + (nb - item.block) * BLOCK,
                                    items.ld(), live, c,
                                    bias_ptr ? bias_ptr + nb * BLOCK : nullptr);
        });
        items.store(item, scratch, y, n);
      });
  return call.result();
#else
  (void)x;
  (void)packed;
  (void)bias;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX512_BF16");
#endif
}

at::Tensor linear_dpbf16_silu_mul(const at::Tensor& x, const at::Tensor& packed) {
#if SPINDLE_DPBF16
  spindle_bf16::check_packed(x, packed, "linear_dpbf16_silu_mul", true);
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK / 2;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, c10::nullopt);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const uint16_t* a = reinterpret_cast<const uint16_t*>(call.rows.data_ptr<at::BFloat16>());
  const char* w = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  const spindle_linear::BlockItems items(m, n / BLOCK, M_CHUNK, BLOCK);
  spindle_pool::run_speculative(
      items.count(), {call.rows, packed, call.out}, [=](int64_t index) {
        const auto item = items[index];
        at::BFloat16* scratch = items.scratch<at::BFloat16>();
        alignas(64) float gate[ROWS][BLOCK], up[ROWS][BLOCK];
        for_each_tile(items, index, [&](int64_t nb, int64_t r, int64_t live, int64_t next_nb) {
          const char* gate_block = w + 2 * nb * block_bytes;
          const char* up_block = gate_block + block_bytes;
          const TileFn multiply = TILES[live - 1];
          const uint16_t* x = a + (item.row + r) * k;
          const char* next_gate = next_nb >= 0 ? w + 2 * next_nb * block_bytes : nullptr;
          multiply(x, k, gate_block, next_gate, k_steps, gate);
          multiply(x, k, up_block, next_gate ? next_gate + block_bytes : nullptr, k_steps, up);
          spindle_bf16::store_gated_block(scratch + r * items.ld() + (nb - item.block) * BLOCK,
                                          items.ld(), live, gate, up);
        });
        items.store(item, scratch, y, n);
      });
  return call.result();
#else
  (void)x;
  (void)packed;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX512_BF16");
#endif
}
