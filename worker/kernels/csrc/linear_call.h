// What both linear kernels (linear_amx.cpp, linear_f32.cpp) do around their product: x's leading
// dims flattened into a contiguous [m, k] matrix, the [m, n] output and the shape it is returned
// in, and the bias (if any) as fp32 for the epilogue.
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

}  // namespace spindle_linear
