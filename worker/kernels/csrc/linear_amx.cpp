// bf16 linear layers (y = x Wᵀ + b) on Intel AMX tiles, for the decode-sized batches where
// oneDNN's prepacked product streams the weights at a third of the machine's memory bandwidth.
//
// A decode step multiplies at most a few dozen rows by every weight of the model once, so its
// cost is reading the weights from DRAM. The product here is laid out for that stream: the packed
// weight (pack_linear_bf16, linear_bf16.cpp) is one contiguous run per 32 output columns
// ([N/32][K/32][2][16][16][2]: per 32x32 block, two AMX B tiles of 16 column pairs in VNNI
// order), each thread takes a contiguous range
// of column blocks, and the B tiles a few K steps ahead are prefetched while the tiles multiply.
// x rows are A tiles read in place (16 rows x 32 elements); a partial last group of 16 rows is
// copied into a zero-padded buffer once per call (copying all of x to pad it cost a prompt step
// of 2,078 rows ~1 ms per 1536-wide product: a third of the product). Each 32x32 output block accumulates in four
// fp32 C tiles over all of K, gets the bias in fp32 and is rounded to bf16 once, as oneDNN does.
// Larger batches (prefill) loop rows in chunks of M_CHUNK inside each column block so the block's
// weights stay in cache while every row passes. A pass's epilogue (bias and rounding, or the
// gated kernel's SiLU(gate) * up, and the stores) runs one pass late, interleaved with the next
// pass's K steps (DeferredEpilogue): done in line it left the tile unit idle for ~25 % (plain,
// K = 576) to ~40 % (gated) of the time; at 2,048 rows the products now match oneDNN's.
//
// Built where the compiler targets AMX-BF16 (g++ -march=native on such a CPU; amx.h); the process
// asks Linux for the tile state once (arch_prctl). Elsewhere `linear_amx_supported` is false and the
// callers take linear_bf16.cpp's AVX512_BF16 product of the same layout, or oneDNN
// (worker/layers/linear.py).
#include "amx.h"
#include "kernels.h"
#include "linear_bf16.h"
#include "linear_call.h"

#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

namespace {

using spindle_bf16::BLOCK;
using spindle_bf16::BLOCK_BYTES;  // two B tiles
constexpr int64_t PREFETCH_STEPS = 4;  // K steps of B tiles prefetched ahead
constexpr int64_t M_CHUNK = 256;       // rows that pass over a column block while it is cached

#if SPINDLE_AMX

using spindle_amx::amx_permitted;
using spindle_amx::configure_tiles;

// tmm0-3: the C tiles of a 32x32 output block (rows 0-15 / 16-31 x columns 0-15 / 16-31),
// tmm4-5: the two A tiles (16 rows x 32 bf16), tmm6-7: the two B tiles (16 pairs x 16 columns).
//
// One 32-column block times one or two groups of 16 rows of x (`a1` null for one), over all of
// K.
//
// `between(step)` runs after each K step's tile instructions are issued: vector work placed there
// (the previous block's epilogue) executes while the tile unit multiplies.
struct Nothing {
  void operator()(int64_t) const {}
};

template <bool PREFETCH, typename Between = Nothing>
void multiply_block(const char* a0, const char* a1, int64_t lda, const char* b, int64_t k_steps,
                    const Between& between = Between{}) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t step = 0; step < k_steps; ++step) {
    const char* b_step = b + step * BLOCK_BYTES;
    if (PREFETCH) {
      const char* ahead = b_step + PREFETCH_STEPS * BLOCK_BYTES;
      for (int64_t line = 0; line < BLOCK_BYTES; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    _tile_loadd(6, b_step, 64);
    _tile_loadd(7, b_step + 1024, 64);
    _tile_loadd(4, a0 + step * 64, lda);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (a1 != nullptr) {
      _tile_loadd(5, a1 + step * 64, lda);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    between(step);
  }
}

// The C tiles of a block (rows [0, rows)) as fp32 rows of 32.
void tiles_to_floats(float (*c)[32], int64_t rows) {
  _tile_stored(0, &c[0][0], 128);
  _tile_stored(1, &c[0][16], 128);
  if (rows > 16) {
    _tile_stored(2, &c[16][0], 128);
    _tile_stored(3, &c[16][16], 128);
  }
}

// x's rows as groups of 16 for A tiles: in place, but for a partial last group, which is copied
// into a zero-padded 16-row buffer (A tiles read 16 rows).
class RowGroups {
 public:
  explicit RowGroups(const at::Tensor& rows)
      : rows_(rows), full_(rows.size(0) / 16 * 16), lda_(rows.size(1) * 2) {
    if (full_ < rows.size(0)) {
      tail_ = at::zeros({16, rows.size(1)}, rows.options());
      tail_.narrow(0, 0, rows.size(0) - full_).copy_(rows.narrow(0, full_, rows.size(0) - full_));
    }
  }
  int64_t lda() const { return lda_; }
  // Rows [r, r + 16) (r a multiple of 16 below m).
  const char* group(int64_t r) const {
    const at::Tensor& source = r < full_ ? rows_ : tail_;
    return reinterpret_cast<const char*>(source.data_ptr<at::BFloat16>()) +
           (r < full_ ? r : 0) * lda_;
  }
  // The groups for a pass over rows [r0, r0 + live), live <= 32: the second null for one.
  std::pair<const char*, const char*> pair(int64_t r0, int64_t live) const {
    return {group(r0), live > 16 ? group(r0 + 16) : nullptr};
  }

 private:
  at::Tensor rows_, tail_;
  int64_t full_, lda_;
};

// A thread's epilogues, one pass (32 rows x a 32-column block) behind its products: the pass
// just multiplied leaves its fp32 sums in one set of buffers while the previous pass's output
// rows are written from the other, a few rows after each K step of the current products
// (`finish_rows`), so the vector unit works while the tile unit multiplies. Done after its
// products instead, the fused gate|up kernel's epilogue (an exp, a division and three bf16
// roundings per output) took ~40 % of its time (2,048 rows: 4.2 ms, 2.5 without it; now 2.9),
// and the plain product's (bias, rounding and the stores) ~25 % at K = 576.
// GATED: SiLU(gate) * up from the `sums()` (gate) and `up()` buffers; else sums + bias.
template <bool GATED>
class DeferredEpilogue {
 public:
  // `steps`: the K steps of one pass's products (k_steps, or 2 k_steps for gate and up).
  DeferredEpilogue(at::BFloat16* y, int64_t n, int64_t steps)
      : y_(y), n_(n), rows_per_step_((32 + steps - 1) / steps) {}

  float (*sums())[BLOCK] { return sums_[current_]; }
  float (*up())[BLOCK] { return up_[current_]; }

  // Rows of the previous pass due by K step `step` of the current pass.
  void finish_rows(int64_t step) { write_rows((step + 1) * rows_per_step_); }

  // The current pass (its sums now in the buffers) becomes the previous one: `rows` rows for
  // y + `out`, plus `bias` (plain products; null for none).
  void next(int64_t out, int64_t rows, const float* bias = nullptr) {
    write_rows(32);  // what the K steps did not cover
    current_ ^= 1;
    pending_out_ = out, pending_rows_ = rows, pending_bias_ = bias, written_ = 0;
  }

  void finish_all() { write_rows(32); }

 private:
  void write_rows(int64_t upto) {
    const int64_t end = std::min(upto, pending_rows_);
    if (written_ >= end) return;
    const int previous = current_ ^ 1;
    at::BFloat16* out = y_ + pending_out_ + written_ * n_;
    if constexpr (GATED)
      spindle_bf16::store_gated_block(out, n_, end - written_, &sums_[previous][written_],
                                      &up_[previous][written_]);
    else
      spindle_bf16::store_block(out, n_, end - written_, &sums_[previous][written_],
                                pending_bias_);
    written_ = end;
  }

  at::BFloat16* y_;
  int64_t n_, rows_per_step_;
  alignas(64) float sums_[2][32][BLOCK];
  alignas(64) float up_[GATED ? 2 : 1][32][BLOCK];
  int current_ = 0;
  int64_t pending_out_ = 0, pending_rows_ = 0, written_ = 0;
  const float* pending_bias_ = nullptr;
};

#endif  // SPINDLE_AMX

}  // namespace

bool linear_amx_supported(int64_t out_features, int64_t in_features) {
#if SPINDLE_AMX
  return out_features % BLOCK == 0 && in_features % BLOCK == 0 && amx_permitted();
#else
  (void)out_features;
  (void)in_features;
  return false;
#endif
}

at::Tensor linear_amx(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
#if SPINDLE_AMX
  TORCH_CHECK(amx_permitted(), "the OS did not grant this process the AMX tile state");
  spindle_bf16::check_packed(x, packed, "linear_amx", false);
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, bias);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const RowGroups a(call.rows);
  const float* bias_ptr = call.bias_data();
  const char* b = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t lda = a.lda(), k_steps = k / BLOCK;
  spindle_pool::parallel_for(0, n / BLOCK, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    DeferredEpilogue<false> passes(y, n, k_steps);
    const auto steps = [&](int64_t step) { passes.finish_rows(step); };
    for (int64_t chunk = 0; chunk < m; chunk += M_CHUNK) {
      const int64_t chunk_end = std::min(m, chunk + M_CHUNK);
      for (int64_t nb = begin; nb < end; ++nb) {
        const char* block = b + nb * k_steps * BLOCK_BYTES;
        const float* block_bias = bias_ptr ? bias_ptr + nb * BLOCK : nullptr;
        for (int64_t r0 = chunk; r0 < chunk_end; r0 += 32) {
          const int64_t live = std::min<int64_t>(32, chunk_end - r0);
          const auto [a0, a1] = a.pair(r0, live);
          if (r0 == chunk)  // the block's first pass reads it from memory: prefetch ahead
            multiply_block<true>(a0, a1, lda, block, k_steps, steps);
          else
            multiply_block<false>(a0, a1, lda, block, k_steps, steps);
          tiles_to_floats(passes.sums(), live);
          passes.next(r0 * n + nb * BLOCK, live, block_bias);
        }
      }
    }
    passes.finish_all();
    _tile_release();
  });
  return call.result();
#else
  (void)x;
  (void)packed;
  (void)bias;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AMX");
#endif
}

at::Tensor linear_amx_silu_mul(const at::Tensor& x, const at::Tensor& packed) {
#if SPINDLE_AMX
  TORCH_CHECK(amx_permitted(), "the OS did not grant this process the AMX tile state");
  spindle_bf16::check_packed(x, packed, "linear_amx_silu_mul", true);
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK / 2;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, c10::nullopt);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const RowGroups a(call.rows);
  const char* b = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t lda = a.lda(), k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  spindle_pool::parallel_for(0, n / BLOCK, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    DeferredEpilogue<true> passes(y, n, 2 * k_steps);
    for (int64_t chunk = 0; chunk < m; chunk += M_CHUNK) {
      const int64_t chunk_end = std::min(m, chunk + M_CHUNK);
      for (int64_t nb = begin; nb < end; ++nb) {
        const char* gate_block = b + 2 * nb * block_bytes;
        for (int64_t r0 = chunk; r0 < chunk_end; r0 += 32) {
          const int64_t live = std::min<int64_t>(32, chunk_end - r0);
          const auto [a0, a1] = a.pair(r0, live);
          const auto gate_steps = [&](int64_t step) { passes.finish_rows(step); };
          const auto up_steps = [&](int64_t step) { passes.finish_rows(k_steps + step); };
          if (r0 == chunk) {  // the block's first pass reads it from memory: prefetch ahead
            multiply_block<true>(a0, a1, lda, gate_block, k_steps, gate_steps);
            tiles_to_floats(passes.sums(), live);
            multiply_block<true>(a0, a1, lda, gate_block + block_bytes, k_steps, up_steps);
          } else {
            multiply_block<false>(a0, a1, lda, gate_block, k_steps, gate_steps);
            tiles_to_floats(passes.sums(), live);
            multiply_block<false>(a0, a1, lda, gate_block + block_bytes, k_steps, up_steps);
          }
          tiles_to_floats(passes.up(), live);
          passes.next(r0 * n + nb * BLOCK, live);
        }
      }
    }
    passes.finish_all();
    _tile_release();
  });
  return call.result();
#else
  (void)x;
  (void)packed;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AMX");
#endif
}
