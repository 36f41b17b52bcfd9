// bf16 linear layers (y = x Wᵀ + b) on Intel AMX tiles, for the decode-sized batches where
// oneDNN's prepacked product streams the weights at a third of the machine's memory bandwidth.
//
// A decode step multiplies at most a few dozen rows by every weight of the model once, so its
// cost is reading the weights from DRAM. The product here is laid out for that stream: the packed
// weight is one contiguous run per 32 output columns ([N/32][K/32][2][16][16][2]: per 32x32
// block, two AMX B tiles of 16 column pairs in VNNI order), each thread takes a contiguous range
// of column blocks, and the B tiles a few K steps ahead are prefetched while the tiles multiply.
// x rows are A tiles read in place (16 rows x 32 elements); a partial last group of 16 rows is
// copied into a zero-padded buffer once per call. Each 32x32 output block accumulates in four
// fp32 C tiles over all of K, gets the bias in fp32 and is rounded to bf16 once, as oneDNN does.
// Larger batches (prefill) loop rows in chunks of M_CHUNK inside each column block so the block's
// weights stay in cache while every row passes.
//
// Built where the compiler targets AMX-BF16 (g++ -march=native on such a CPU; amx.h); the process
// asks Linux for the tile state once (arch_prctl). Elsewhere `linear_amx_supported` is false and the
// callers keep oneDNN (worker/layers/linear.py).
#include "amx.h"
#include "kernels.h"
#include "linear_call.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t BLOCK = 32;         // output columns and K elements per packed block
constexpr int64_t BLOCK_BYTES = 2048;  // 32 x 32 bf16: two B tiles
constexpr int64_t PREFETCH_STEPS = 4;  // K steps of B tiles prefetched ahead
constexpr int64_t M_CHUNK = 256;       // rows that pass over a column block while it is cached

#if SPINDLE_AMX

using spindle_amx::amx_permitted;
using spindle_amx::configure_tiles;

// tmm0-3: the C tiles of a 32x32 output block (rows 0-15 / 16-31 x columns 0-15 / 16-31),
// tmm4-5: the two A tiles (16 rows x 32 bf16), tmm6-7: the two B tiles (16 pairs x 16 columns).
//
// One 32-column block times `row_groups` (1 or 2) groups of 16 rows of x, over all of K.
template <bool PREFETCH>
void multiply_block(const char* a, int64_t lda, const char* b, int64_t k_steps, int row_groups) {
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
    _tile_loadd(4, a + step * 64, lda);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (row_groups == 2) {
      _tile_loadd(5, a + 16 * lda + step * 64, lda);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
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

// The C tiles plus bias, rounded to bf16, into rows [0, rows) of the block's output.
void store_block(uint16_t* out, int64_t ldo, int64_t rows, const float* bias) {
  alignas(64) float c[32][32];
  tiles_to_floats(c, rows);
  const __m512 bias_lo = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias_hi = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lo = _mm512_add_ps(_mm512_load_ps(&c[r][0]), bias_lo);
    const __m512 hi = _mm512_add_ps(_mm512_load_ps(&c[r][16]), bias_hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo), (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 16),
                        (__m256i)_mm512_cvtneps_pbh(hi));
  }
}

// SiLU(gate) * up for rows [0, rows) of a 32-column output block, from the fp32 products of the
// matching gate and up columns, rounded as the unfused layers round: gate and up to bf16 (the
// linear's output), SiLU(gate) to bf16 (the activation's), the product to bf16.
void store_gated_block(at::BFloat16* out, int64_t ldo, int64_t rows, const float (*gate)[32],
                       const float (*up)[32]) {
  using namespace spindle_vec;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t half = 0; half < 32; half += 16) {
      const vec activated =
          round_vec<at::BFloat16>(silu(round_vec<at::BFloat16>(load(&gate[r][half]))));
      store(out + r * ldo + half, activated * round_vec<at::BFloat16>(load(&up[r][half])));
    }
}

// x's rows, padded with zero rows to a multiple of 16 (A tiles read 16 rows).
at::Tensor padded_rows(const spindle_linear::LinearCall& call) {
  const int64_t m = call.m();
  if (m % 16 == 0) return call.rows;
  at::Tensor rows = at::zeros({(m + 15) / 16 * 16, call.rows.size(1)}, call.rows.options());
  rows.narrow(0, 0, m).copy_(call.rows);
  return rows;
}

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

at::Tensor pack_linear_amx(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "a 2-d bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % BLOCK == 0 && k % BLOCK == 0, "weight dims must be multiples of 32");
  const at::Tensor plain = weight.contiguous();
  // [N/32][K/32][half: 16 columns][16 K pairs][16 columns][2]
  at::Tensor packed = at::empty({n / BLOCK, k / BLOCK, 2, 16, 16, 2}, weight.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(plain.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, n / BLOCK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t col = 0; col < BLOCK; ++col)
        for (int64_t kk = 0; kk < k; ++kk) {
          const int64_t at = ((((nb * (k / BLOCK) + kk / BLOCK) * 2 + col / 16) * 16 +
                               (kk % BLOCK) / 2) * 16 + col % 16) * 2 + kk % 2;
          dst[at] = src[(nb * BLOCK + col) * k + kk];
        }
  });
  return packed;
}

at::Tensor linear_amx(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias) {
#if SPINDLE_AMX
  TORCH_CHECK(amx_permitted(), "the OS did not grant this process the AMX tile state");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_amx multiplies bf16");
  TORCH_CHECK(packed.dim() == 6, "pack the weight with pack_linear_amx");
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, bias);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const at::Tensor rows = padded_rows(call);
  const float* bias_ptr = call.bias_data();
  const char* a = reinterpret_cast<const char*>(rows.data_ptr<at::BFloat16>());
  const char* b = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  uint16_t* y = reinterpret_cast<uint16_t*>(call.out.data_ptr<at::BFloat16>());
  const int64_t lda = k * 2, k_steps = k / BLOCK;
  at::parallel_for(0, n / BLOCK, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    for (int64_t chunk = 0; chunk < m; chunk += M_CHUNK) {
      const int64_t chunk_end = std::min(m, chunk + M_CHUNK);
      for (int64_t nb = begin; nb < end; ++nb) {
        const char* block = b + nb * k_steps * BLOCK_BYTES;
        const float* block_bias = bias_ptr ? bias_ptr + nb * BLOCK : nullptr;
        for (int64_t r0 = chunk; r0 < chunk_end; r0 += 32) {
          const int64_t live = std::min<int64_t>(32, chunk_end - r0);
          const int groups = live > 16 ? 2 : 1;
          if (r0 == chunk)  // the block's first pass reads it from memory: prefetch ahead
            multiply_block<true>(a + r0 * lda, lda, block, k_steps, groups);
          else
            multiply_block<false>(a + r0 * lda, lda, block, k_steps, groups);
          store_block(y + r0 * n + nb * BLOCK, n, live, block_bias);
        }
      }
    }
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

at::Tensor pack_linear_amx_gated(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % (2 * BLOCK) == 0,
              "a [2 x intermediate, in] gate|up weight, intermediate a multiple of 32");
  const int64_t n = weight.size(0), k = weight.size(1);
  // gate and up column blocks alternate: block 2j = gate columns [32j, 32j + 32), 2j + 1 = up's
  return pack_linear_amx(weight.view({2, n / 2 / BLOCK, BLOCK, k}).transpose(0, 1).reshape({n, k}));
}

at::Tensor linear_amx_silu_mul(const at::Tensor& x, const at::Tensor& packed) {
#if SPINDLE_AMX
  TORCH_CHECK(amx_permitted(), "the OS did not grant this process the AMX tile state");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_amx_silu_mul multiplies bf16");
  TORCH_CHECK(packed.dim() == 6 && packed.size(0) % 2 == 0,
              "pack the weight with pack_linear_amx_gated");
  const int64_t k = packed.size(1) * BLOCK, n = packed.size(0) * BLOCK / 2;
  spindle_linear::LinearCall call = spindle_linear::prepare(x, k, n, c10::nullopt);
  const int64_t m = call.m();
  if (m == 0) return call.result();
  const at::Tensor rows = padded_rows(call);
  const char* a = reinterpret_cast<const char*>(rows.data_ptr<at::BFloat16>());
  const char* b = reinterpret_cast<const char*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y = call.out.data_ptr<at::BFloat16>();
  const int64_t lda = k * 2, k_steps = k / BLOCK, block_bytes = k_steps * BLOCK_BYTES;
  at::parallel_for(0, n / BLOCK, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float gate[32][32], up[32][32];
    for (int64_t chunk = 0; chunk < m; chunk += M_CHUNK) {
      const int64_t chunk_end = std::min(m, chunk + M_CHUNK);
      for (int64_t nb = begin; nb < end; ++nb) {
        const char* gate_block = b + 2 * nb * block_bytes;
        for (int64_t r0 = chunk; r0 < chunk_end; r0 += 32) {
          const int64_t live = std::min<int64_t>(32, chunk_end - r0);
          const int groups = live > 16 ? 2 : 1;
          if (r0 == chunk) {
            multiply_block<true>(a + r0 * lda, lda, gate_block, k_steps, groups);
            tiles_to_floats(gate, live);
            multiply_block<true>(a + r0 * lda, lda, gate_block + block_bytes, k_steps, groups);
          } else {
            multiply_block<false>(a + r0 * lda, lda, gate_block, k_steps, groups);
            tiles_to_floats(gate, live);
            multiply_block<false>(a + r0 * lda, lda, gate_block + block_bytes, k_steps, groups);
          }
          tiles_to_floats(up, live);
          store_gated_block(y + r0 * n + nb * BLOCK, n, live, gate, up);
        }
      }
    }
    _tile_release();
  });
  return call.result();
#else
  (void)x;
  (void)packed;
  TORCH_CHECK(false, "spindle's CPU kernels were built without AMX");
#endif
}
