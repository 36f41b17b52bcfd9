// float32 linear layers (y = x Wᵀ + b) with FMAs, laid out for streaming the weights.
//
// The fp32 twin of linear_amx.cpp: at decode batch sizes a step reads every weight once, and
// oneDNN's prepacked product leaves much of the memory bandwidth idle. The packed weight is one
// contiguous run per 32 output columns ([N/32][K][32]); each item (linear_call.h's BlockItems: a
// run of column blocks over up to M_CHUNK rows, computed speculatively on the kernels' pool,
// pool.h) multiplies up to ROWS rows of x at a time into register accumulators (x broadcast one
// element at a time, the block's weight row as vectors). A pass over a block prefetches the
// run's NEXT block (after its last, the block the thread's next item likely starts with) into L2
// row by row — every pass of a few rows' product, the first of a prompt's (linear_call.h's
// for_each_tile) — so the next block's DRAM read overlaps this block's arithmetic, and a single
// pass streams one block ahead. Sums are fp32 FMAs over K in order, as a plain dot product would
// add them. The gated variant (linear_f32_silu_mul) multiplies gate and up column blocks packed
// in alternation and writes SiLU(gate) * up, as linear_bf16.cpp's does for bf16.
//
// Two register tilings: with AVX-512, 8 rows x 32 columns (16 accumulators); with AVX2 + FMA (16
// registers: AMD Zen 2/3, Intel Haswell to Alder Lake), 6 rows x 16 columns (12 accumulators),
// the block's two 16-column halves one after the other — so there a block is packed as its two
// halves' runs ([N/32][2][K][16]), each read in order (with the halves' rows interleaved, every
// other 64-byte line: 65-83 GFLOP/s on one Zen 3 core against 80-87 in order, measured with a
// standalone copy of the tile). Elsewhere `linear_f32_supported` is false and the callers keep
// oneDNN (worker/layers/linear.py).
#include "kernels.h"
#include "linear_call.h"
#include "vec.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__AVX512F__)
#define SPINDLE_F32_LINEAR 512
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define SPINDLE_F32_LINEAR 256
#include <immintrin.h>
#endif

namespace {

constexpr int64_t COLS = 32;      // output columns per packed block
constexpr int64_t M_CHUNK = 256;  // rows that pass over a column block while it is cached
#if SPINDLE_F32_LINEAR == 256
constexpr int64_t RUN = 16;  // columns of a block in one contiguous run: [N/32][2][K][16]
#else
constexpr int64_t RUN = 32;  // [N/32][K][32]
#endif

#if SPINDLE_F32_LINEAR == 512

// Rows of x per register tile (16 accumulators). 12 rows (24 accumulators) ran 2-4 % slower on
// Zen 4 at every batch from 32 to 2,048 rows (one layer's linears, 2 threads, alternating: 220
// against 228 GFLOP/s at 2,048 rows, 206 against 211 at 32; a standalone one-core tile over
// L2-resident blocks 106 against 112-114, the FMA peak ~115), and a 256-row chunk is 21 tiles
// of 12 and a partial one of 4.
constexpr int ROWS = 8;

// Rows [0, R) of x times one packed block `w` into y; `next` (the next block, or null) is
// prefetched into L2 on the way.
template <int R>
void multiply_tile(const float* x, int64_t ldx, const float* w, const float* next, int64_t k,
                   float* y, int64_t ldy, const float* bias) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* w_row = w + kk * COLS;
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + kk * COLS), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + kk * COLS + 16), _MM_HINT_T1);
    }
    const __m512 w_lo = _mm512_loadu_ps(w_row), w_hi = _mm512_loadu_ps(w_row + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + kk]);
      lo[r] = _mm512_fmadd_ps(xv, w_lo, lo[r]);
      hi[r] = _mm512_fmadd_ps(xv, w_hi, hi[r]);
    }
  }
  const __m512 bias_lo = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias_hi = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(lo[r], bias_lo));
    _mm512_storeu_ps(y + r * ldy + 16, _mm512_add_ps(hi[r], bias_hi));
  }
}

#elif SPINDLE_F32_LINEAR == 256

constexpr int ROWS = 6;  // rows of x per register tile (12 accumulators)

// Rows [0, R) of x times one 16-column half of a packed block (`w`: the half's [K][16] run);
// `next` (the next block, or null) is prefetched into L2 on the way, both halves' rows.
template <int R>
void multiply_half(const float* x, int64_t ldx, const float* w, const float* next, int64_t k,
                   float* y, int64_t ldy, const float* bias) {
  __m256 lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* w_row = w + kk * RUN;
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + kk * RUN), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + (k + kk) * RUN), _MM_HINT_T1);
    }
    const __m256 w_lo = _mm256_loadu_ps(w_row), w_hi = _mm256_loadu_ps(w_row + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + kk);
      lo[r] = _mm256_fmadd_ps(xv, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, w_hi, hi[r]);
    }
  }
  const __m256 bias_lo = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 bias_hi = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(lo[r], bias_lo));
    _mm256_storeu_ps(y + r * ldy + 8, _mm256_add_ps(hi[r], bias_hi));
  }
}

// Rows [0, R) of x times one packed block: its two halves in turn (the first prefetches `next`).
template <int R>
void multiply_tile(const float* x, int64_t ldx, const float* w, const float* next, int64_t k,
                   float* y, int64_t ldy, const float* bias) {
  multiply_half<R>(x, ldx, w, next, k, y, ldy, bias);
  multiply_half<R>(x, ldx, w + k * RUN, nullptr, k, y + 16, ldy, bias ? bias + 16 : nullptr);
}

#endif

#if SPINDLE_F32_LINEAR

using TileFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*,
                        int64_t, const float*);

template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&multiply_tile<R + 1>...};
}

const std::array<TileFn, ROWS> TILES = tile_table(std::make_integer_sequence<int, ROWS>{});  // [rows - 1]

#endif  // SPINDLE_F32_LINEAR

}  // namespace

bool linear_f32_supported(int64_t out_features, int64_t in_features) {
#if SPINDLE_F32_LINEAR
  return out_features % COLS == 0 && in_features > 0;
#else
  (void)out_features;
  (void)in_features;
  return false;
#endif
}

at::Tensor pack_linear_f32(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "a 2-d float32 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % COLS == 0, "out_features must be a multiple of 32");
  // block b, row kk, column c < RUN of its run h holds W[b*32 + h*RUN + c][kk]
  return weight.reshape({n / COLS, COLS / RUN, RUN, k}).transpose(2, 3).contiguous();
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
#if SPINDLE_F32_LINEAR
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "linear_f32 multiplies float32");
  TORCH_CHECK(packed.dim() == 4 && packed.size(3) == RUN, "pack the weight with pack_linear_f32");
  const int64_t k = packed.size(2), n = packed.size(0) * COLS;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, bias);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const float* bias_ptr = call.bias_data();
  const float* a = call.rows.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  float* y = call.out.data_ptr<float>();
  const spindle_linear::BlockItems items(m, n / COLS, M_CHUNK, COLS);
  spindle_pool::run_speculative(
      items.count(), {call.rows, packed, call.out, call.bias}, [=](int64_t index) {
        const auto item = items[index];
        float* scratch = items.scratch<float>();
        spindle_linear::for_each_tile<ROWS>(items, index, [&](int64_t nb, int64_t r, int64_t live,
                                                              int64_t next_nb) {
          TILES[live - 1](a + (item.row + r) * k, k, w + nb * k * COLS,
                          next_nb >= 0 ? w + next_nb * k * COLS : nullptr, k,
                          scratch + r * items.ld() + (nb - item.block) * COLS, items.ld(),
                          bias_ptr ? bias_ptr + nb * COLS : nullptr);
        });
        items.store(item, scratch, y, n);
      });
  return call.result();
#else
  (void)x;
  (void)packed;
  (void)bias;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX-512 or AVX2");
#endif
}

at::Tensor pack_linear_f32_gated(const at::Tensor& weight) {
  return pack_linear_f32(spindle_linear::interleave_gate_up(weight, COLS));
}

at::Tensor linear_f32_silu_mul(const at::Tensor& x, const at::Tensor& packed) {
#if SPINDLE_F32_LINEAR
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "linear_f32_silu_mul multiplies float32");
  TORCH_CHECK(packed.dim() == 4 && packed.size(3) == RUN && packed.size(0) % 2 == 0,
              "pack the weight with pack_linear_f32_gated");
  const int64_t k = packed.size(2), n = packed.size(0) * COLS / 2, block = k * COLS;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, c10::nullopt);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const float* a = call.rows.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  float* y = call.out.data_ptr<float>();
  const spindle_linear::BlockItems items(m, n / COLS, M_CHUNK, COLS);
  spindle_pool::run_speculative(
      items.count(), {call.rows, packed, call.out}, [=](int64_t index) {
        const auto item = items[index];
        float* scratch = items.scratch<float>();
        alignas(64) float gate[ROWS][COLS], up[ROWS][COLS];
        spindle_linear::for_each_tile<ROWS>(items, index, [&](int64_t nb, int64_t r, int64_t live,
                                                              int64_t next_nb) {
          const float* gate_block = w + 2 * nb * block;
          const float* x = a + (item.row + r) * k;
          // the gate pass prefetches the next pair's gate, the up pass its up
          const float* next_gate = next_nb >= 0 ? w + 2 * next_nb * block : nullptr;
          TILES[live - 1](x, k, gate_block, next_gate, k, &gate[0][0], COLS, nullptr);
          TILES[live - 1](x, k, gate_block + block, next_gate ? next_gate + block : nullptr, k,
                          &up[0][0], COLS, nullptr);
          spindle_vec::store_silu_mul(scratch + r * items.ld() + (nb - item.block) * COLS,
                                      items.ld(), live, &gate[0][0], &up[0][0], COLS, COLS);
        });
        items.store(item, scratch, y, n);
      });
  return call.result();
#else
  (void)x;
  (void)packed;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AVX-512 or AVX2");
#endif
}
