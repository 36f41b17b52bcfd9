// bf16 linear layers (y = x Wᵀ + b): the packed layout all bf16 kernels read, and the vector
// product for CPUs without AMX tiles (linear_amx.cpp multiplies the same layout on AMX tiles):
// with AVX512_BF16 dot products (`vdpbf16ps`: AMD Zen 4/5, Intel Cooper Lake) where the build has
// them, else with AVX2 FMAs on the weights widened to fp32 in registers (AMD Zen 2/3, Intel
// Haswell to Alder Lake, where oneDNN has no bf16 product and torch's reference one runs at ~15
// GFLOP/s).
//
// Layout: one contiguous run per 32 output columns, [N/32][K/32][2][16][16][2] — per 32x32 block,
// two halves of 16 columns, each 16 K pairs x 16 columns x 2 (an AMX B tile, VNNI order). One
// 64-byte row of a half is what `vdpbf16ps` multiplies: 16 columns x one K pair. The AVX2 product
// widens such a row into the pair's even-K and odd-K fp32 vectors with one shift and one mask
// per 8 columns (a bf16 is the top half of its fp32); it multiplies one half at a time, so its
// build packs each half's K steps in one run ([N/32][2][K/32][16][16][2]; with the halves
// alternating every 1 KB, 63-65 GFLOP/s on one Zen 3 core against 71-88 in one run, measured
// with a standalone copy of the tile).
//
// The product mirrors linear_f32.cpp: each item (linear_call.h's BlockItems: a run of column blocks
// over up to M_CHUNK rows, computed speculatively on the kernels' pool, pool.h) multiplies up to
// ROWS rows of x at a time into fp32 accumulators (dpbf16: 12 rows x 32 columns, x's K pair
// broadcast; AVX2: 5 rows x 16 columns per half, x widened to fp32 once per call and broadcast an
// element at a time, the sums over K in order); passes over a block prefetch the run's next block
// (after the run's last, the block the thread's next item likely starts with; which passes ask:
// linear_call.h's for_each_tile), and the item's rows pass over each block while it is cached.
// Each output is the fp32 sum plus the bias, rounded to bf16 once, as oneDNN and the AMX kernel
// round; the gated variant applies SiLU(gate) * up as the unfused layers round.
#include "kernels.h"
#include "linear_bf16.h"
#include "linear_call.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512BF16__)
#define SPINDLE_BF16_LINEAR 512
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define SPINDLE_BF16_LINEAR 256
#include <immintrin.h>
#endif

namespace {

using spindle_bf16::BLOCK;
using spindle_bf16::BLOCK_BYTES;

constexpr int64_t M_CHUNK = 256;  // rows that pass over a column block while it is cached

#if SPINDLE_BF16_LINEAR == 512

constexpr int ROWS = 12;  // rows of x per register tile (24 accumulators)
using XElem = uint16_t;   // x as the tiles read it: bf16 bits

at::Tensor tile_input(const at::Tensor& rows) { return rows; }

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

#elif SPINDLE_BF16_LINEAR == 256

constexpr int ROWS = 5;  // rows of x per register tile (10 accumulators + 4 widened weights)
using XElem = float;     // x as the tiles read it: widened to fp32
constexpr int64_t HALF_STEP_BYTES = BLOCK_BYTES / 2;  // one half's 16 columns x 32 K

// x's bf16 rows widened to fp32 (exactly) on the kernels' threads, once per product.
at::Tensor tile_input(const at::Tensor& rows) {
  at::Tensor wide = at::empty(rows.sizes(), rows.options().dtype(at::kFloat));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(wide.data_ptr<float>());
  spindle_pool::parallel_for(0, rows.numel(), 1 << 16, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
  });
  return wide;
}

// Rows [0, R) of x (fp32, `ldx` apart) times one packed block over all of K, as fp32 rows of 32
// in `c`, one 16-column half at a time; the first half's pass prefetches `next` into L2.
template <int R>
void multiply_tile(const float* x, int64_t ldx, const char* block, const char* next,
                   int64_t k_steps, float (*c)[BLOCK]) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int half = 0; half < 2; ++half) {
    __m256 lo[R], hi[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t step = 0; step < k_steps; ++step) {
      const char* b = block + (half * k_steps + step) * HALF_STEP_BYTES;
      if (next && half == 0)
        for (int64_t line = 0; line < HALF_STEP_BYTES; line += 64) {
          _mm_prefetch(next + step * HALF_STEP_BYTES + line, _MM_HINT_T1);
          _mm_prefetch(next + (k_steps + step) * HALF_STEP_BYTES + line, _MM_HINT_T1);
        }
      const float* x_step = x + step * BLOCK;
#pragma GCC unroll 1
      for (int pair = 0; pair < 16; ++pair) {
        // 8 columns x (even K, odd K) per 32-bit lane: the even bf16 in the low half
        const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + pair * 64));
        const __m256i w_hi =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + pair * 64 + 32));
        const __m256 even_lo = _mm256_castsi256_ps(_mm256_slli_epi32(w_lo, 16));
        const __m256 even_hi = _mm256_castsi256_ps(_mm256_slli_epi32(w_hi, 16));
        const __m256 odd_lo = _mm256_castsi256_ps(_mm256_and_si256(w_lo, odd_mask));
        const __m256 odd_hi = _mm256_castsi256_ps(_mm256_and_si256(w_hi, odd_mask));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(x_step + r * ldx + 2 * pair);
          lo[r] = _mm256_fmadd_ps(xv, even_lo, lo[r]);
          hi[r] = _mm256_fmadd_ps(xv, even_hi, hi[r]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(x_step + r * ldx + 2 * pair + 1);
          lo[r] = _mm256_fmadd_ps(xv, odd_lo, lo[r]);
          hi[r] = _mm256_fmadd_ps(xv, odd_hi, hi[r]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(&c[r][half * 16], lo[r]);
      _mm256_store_ps(&c[r][half * 16 + 8], hi[r]);
    }
  }
}

#endif

#if SPINDLE_BF16_LINEAR

using TileFn = void (*)(const XElem*, int64_t, const char*, const char*, int64_t,
                        float (*)[BLOCK]);

template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&multiply_tile<R + 1>...};
}

const std::array<TileFn, ROWS> TILES = tile_table(std::make_integer_sequence<int, ROWS>{});  // [rows - 1]

#endif  // SPINDLE_BF16_LINEAR

}  // namespace

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "a 2-d bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % BLOCK == 0 && k % BLOCK == 0, "weight dims must be multiples of 32");
  // [N/32][K/32][half][K pair][column][2] = W[nb*32 + half*16 + column][kb*32 + 2*pair + i];
  // the AVX2 product reads each half in one run: [N/32][half][K/32][K pair][column][2]
  const auto blocks = weight.contiguous().view({n / BLOCK, 2, 16, k / BLOCK, 16, 2});
#if SPINDLE_BF16_LINEAR == 256
  return blocks.permute({0, 1, 3, 4, 2, 5}).contiguous();
#else
  return blocks.permute({0, 3, 1, 4, 2, 5}).contiguous();
#endif
}

at::Tensor pack_linear_bf16_gated(const at::Tensor& weight) {
  return pack_linear_bf16(spindle_linear::interleave_gate_up(weight, BLOCK));
}

bool linear_bf16_supported(int64_t out_features, int64_t in_features) {
#if SPINDLE_BF16_LINEAR
  return out_features % BLOCK == 0 && in_features % BLOCK == 0;
#else
  (void)out_features;
  (void)in_features;
  return false;
#endif
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                         const c10::optional<at::Tensor>& bias) {
#if SPINDLE_BF16_LINEAR
  spindle_bf16::check_packed(x, packed, "linear_bf16", false);
  const int64_t k = packed.numel() / packed.size(0) / BLOCK, n = packed.size(0) * BLOCK;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, bias);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const float* bias_ptr = call.bias_data();
  const at::Tensor input = tile_input(call.rows);
  const XElem* a = static_cast<const XElem*>(input.data_ptr());
  const char* w = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  const spindle_linear::BlockItems items(m, n / BLOCK, M_CHUNK, BLOCK);
  spindle_pool::run_speculative(
      items.count(), {input, packed, call.out, call.bias}, [=](int64_t index) {
        const auto item = items[index];
        at::BFloat16* scratch = items.scratch<at::BFloat16>();
        alignas(64) float c[ROWS][BLOCK];
        spindle_linear::for_each_tile<ROWS>(items, index, [&](int64_t nb, int64_t r, int64_t live,
                                                              int64_t next_nb) {
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
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX512_BF16 or AVX2");
#endif
}

at::Tensor linear_bf16_silu_mul(const at::Tensor& x, const at::Tensor& packed) {
#if SPINDLE_BF16_LINEAR
  spindle_bf16::check_packed(x, packed, "linear_bf16_silu_mul", true);
  const int64_t k = packed.numel() / packed.size(0) / BLOCK, n = packed.size(0) * BLOCK / 2;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, c10::nullopt);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const at::Tensor input = tile_input(call.rows);
  const XElem* a = static_cast<const XElem*>(input.data_ptr());
  const char* w = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  const spindle_linear::BlockItems items(m, n / BLOCK, M_CHUNK, BLOCK);
  spindle_pool::run_speculative(
      items.count(), {input, packed, call.out}, [=](int64_t index) {
        const auto item = items[index];
        at::BFloat16* scratch = items.scratch<at::BFloat16>();
        alignas(64) float gate[ROWS][BLOCK], up[ROWS][BLOCK];
        spindle_linear::for_each_tile<ROWS>(items, index, [&](int64_t nb, int64_t r, int64_t live,
                                                              int64_t next_nb) {
          const char* gate_block = w + 2 * nb * block_bytes;
          const char* up_block = gate_block + block_bytes;
          const TileFn multiply = TILES[live - 1];
          const XElem* x = a + (item.row + r) * k;
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
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX512_BF16 or AVX2");
#endif
}
