// What the two bf16 linear kernels (linear_amx.cpp on AMX tiles, linear_bf16.cpp with
// AVX512_BF16 dot products) share: the packed weight's 32x32 blocks (linear_bf16.cpp describes
// the layout) and the epilogues that turn a block's fp32 sums into bf16 outputs.
#pragma once

#include "vec.h"

#include <cstdint>

namespace spindle_bf16 {

constexpr int64_t BLOCK = 32;          // output columns and K elements per packed block
constexpr int64_t BLOCK_BYTES = 2048;  // 32 x 32 bf16

// That `x` and `packed` are what the bf16 product `what` multiplies: bf16, the weight packed by
// pack_linear_bf16 (or, `gated`, pack_linear_bf16_gated).
inline void check_packed(const at::Tensor& x, const at::Tensor& packed, const char* what,
                         bool gated) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, what,
              " multiplies bf16");
  TORCH_CHECK(packed.dim() == 6 && (!gated || packed.size(0) % 2 == 0), "pack the weight with ",
              gated ? "pack_linear_bf16_gated" : "pack_linear_bf16");
}

// Rows [0, rows) of a block's fp32 sums `c` plus the bias (if any), rounded to bf16 once.
inline void store_block(at::BFloat16* out, int64_t ldo, int64_t rows, const float (*c)[BLOCK],
                        const float* bias) {
  using namespace spindle_vec;
  constexpr int64_t VECS = BLOCK / LANES;
  vec bias_vecs[VECS];
  for (int64_t j = 0; j < VECS; ++j) bias_vecs[j] = bias ? load(bias + j * LANES) : vec{};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < VECS; ++j)
      store(out + r * ldo + j * LANES, load(&c[r][j * LANES]) + bias_vecs[j]);
}

// SiLU(gate) * up for rows [0, rows) of a 32-column output block, from the fp32 sums of the
// matching gate and up columns (spindle_vec::store_silu_mul rounds as the unfused layers do).
inline void store_gated_block(at::BFloat16* out, int64_t ldo, int64_t rows,
                              const float (*gate)[BLOCK], const float (*up)[BLOCK]) {
  spindle_vec::store_silu_mul(out, ldo, rows, &gate[0][0], &up[0][0], BLOCK, BLOCK);
}

}  // namespace spindle_bf16
