// What the linear kernels (linear_amx.cpp, linear_bf16.cpp, linear_f32.cpp) do around their
// product: x's leading dims flattened into a contiguous [m, k] matrix, the [m, n] output and the
// shape it is returned in, the bias (if any) as fp32 for the epilogue, and the gate|up weight's
// column blocks interleaved for the fused SiLU-and-multiply kernels.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace spindle_linear {

struct LinearCall {
  at::Tensor rows;                 // [m, k], contiguous
  at::Tensor out;                  // [m, n], x's dtype
  std::vector<int64_t> out_shape;  // x's leading dims, then n
  at::Tensor bias;                 // [n] fp32, or undefined

  int64_t m() const { return rows.size(0); }
  const float* bias_data() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }
  at::Tensor result() const { return out.view(out_shape); }
};

inline LinearCall prepare(const at::Tensor& x, int64_t k, int64_t n,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features, the weight ", k);
  LinearCall call;
  call.rows = x.reshape({-1, k}).contiguous();
  call.out = at::empty({call.rows.size(0), n}, x.options());
  call.out_shape.assign(x.sizes().begin(), x.sizes().end());
  call.out_shape.back() = n;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bias has ", bias->numel(), " values, the output ", n);
    call.bias = bias->to(at::kFloat).contiguous();
  }
  return call;
}

// A [2 x intermediate, in] gate|up weight with its `block`-column blocks alternating: block 2j =
// gate columns [block j, block j + block), 2j + 1 = up's (GateUpParallelLinear.matmul undoes it).
inline at::Tensor interleave_gate_up(const at::Tensor& weight, int64_t block) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % (2 * block) == 0,
              "a [2 x intermediate, in] gate|up weight, intermediate a multiple of ", block);
  const int64_t n = weight.size(0), k = weight.size(1);
  return weight.view({2, n / 2 / block, block, k}).transpose(0, 1).reshape({n, k});
}

}  // namespace spindle_linear
