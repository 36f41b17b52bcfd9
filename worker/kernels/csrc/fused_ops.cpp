// Element-wise layers of Llama-style blocks, one pass each over contiguous rows, in float32
// arithmetic. Each result is rounded to the activation dtype exactly where the eager torch code
// (worker/layers/norm.py, rotary.py, activation.py) rounds, so bf16 outputs match it bit for bit
// up to the order of float additions. Rows are split across the kernels' threads (pool.h).
#include "kernels.h"
#include "vec.h"

#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

// A call over fewer elements than this runs on the calling thread: waking the other threads and
// meeting them at the barrier costs more than a decode step's rows (32 x 576 elements, a few
// microseconds of work) take to compute.
constexpr int64_t kParallelElements = 1 << 16;

inline int64_t grain_rows(int64_t row_size) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_size));
}

template <typename T>
inline float round_to(float value) {  // the value as T would hold it
  return static_cast<float>(static_cast<T>(value));
}

// float and bf16 rows go through vec.h's 16-lane loads and rounding stores; fp16 and fp64 rows
// (never on the hot path) through the scalar loops.
template <typename T>
constexpr bool kVectorRows = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;

// y = weight * RMSNorm(x) for one row, x * scale rounded to T before the weight multiplies it.
template <typename T>
void norm_row(T* y, const T* x, const T* weight, int64_t size, float eps) {
  using namespace spindle_vec;
  if constexpr (kVectorRows<T>) {
    if (size % LANES == 0) {
      vec squares{};
      for (int64_t i = 0; i < size; i += LANES) {
        const vec v = load(x + i);
        squares += v * v;
      }
      float total = 0.0f;
      for (int64_t l = 0; l < LANES; ++l) total += squares[l];
      const vec scale = splat(1.0f / std::sqrt(total / static_cast<float>(size) + eps));
      for (int64_t i = 0; i < size; i += LANES)
        store(y + i, load(weight + i) * round_vec<T>(load(x + i) * scale));
      return;
    }
  }
  float squares = 0.0f;
  for (int64_t i = 0; i < size; ++i) {
    const float v = static_cast<float>(x[i]);
    squares += v * v;
  }
  const float scale = 1.0f / std::sqrt(squares / static_cast<float>(size) + eps);
  for (int64_t i = 0; i < size; ++i) {
    const float normed = round_to<T>(static_cast<float>(x[i]) * scale);
    y[i] = static_cast<T>(static_cast<float>(weight[i]) * normed);
  }
}

// residual += x (rounded to T), one row.
template <typename T>
void add_row(T* residual, const T* x, int64_t size) {
  using namespace spindle_vec;
  int64_t i = 0;
  if constexpr (kVectorRows<T>)
    for (; i + LANES <= size; i += LANES) store(residual + i, load(x + i) + load(residual + i));
  for (; i < size; ++i)
    residual[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
}

template <typename T>
void norm_rows(T* out, const T* in, const T* weight, int64_t rows, int64_t size, float eps) {
  spindle_pool::parallel_for(0, rows, grain_rows(size), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(out + r * size, in + r * size, weight, size, eps);
  });
}

// residual += x, then x = weight * RMSNorm(residual), row by row in one pass.
template <typename T>
void add_norm_rows(T* x, T* residual, const T* weight, int64_t rows, int64_t size, float eps) {
  spindle_pool::parallel_for(0, rows, grain_rows(2 * size), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      add_row(residual + r * size, x + r * size, size);
      norm_row(x + r * size, residual + r * size, weight, size, eps);
    }
  });
}

template <typename T>
void rotate(T* base, int64_t tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
            int64_t dim, const int64_t* positions, const float* cos_cache, const float* sin_cache) {
  const int64_t half = dim / 2;
  spindle_pool::parallel_for(0, tokens, grain_rows(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos_row = cos_cache + positions[t] * dim;
      const float* sin_row = sin_cache + positions[t] * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = base + t * token_stride + h * head_stride;
        for (int64_t i = 0; i < half; ++i) {
          const float first = static_cast<float>(x[i]), second = static_cast<float>(x[i + half]);
          // q * cos + rotate_half(q) * sin, rotate_half(q) = (-second, first)
          const float a0 = round_to<T>(first * round_to<T>(cos_row[i]));
          const float b0 = round_to<T>(-second * round_to<T>(sin_row[i]));
          const float a1 = round_to<T>(second * round_to<T>(cos_row[i + half]));
          const float b1 = round_to<T>(first * round_to<T>(sin_row[i + half]));
          x[i] = static_cast<T>(a0 + b0);
          x[i + half] = static_cast<T>(a1 + b1);
        }
      }
    }
  });
}

// SiLU(g) * u for one row: 16 lanes at a time with vec.h's polynomial exp (the scalar loop
// called libm's expf per element: 1.3 ms for a 2,048-token prompt's 2048 x 1536 outputs), the
// activation rounded to T before the product as torch's silu-then-multiply rounds it.
template <typename T>
void silu_mul_row(T* y, const T* gate, const T* up, int64_t size) {
  using namespace spindle_vec;
  int64_t i = 0;
  if constexpr (kVectorRows<T>)
    for (; i + LANES <= size; i += LANES)
      store(y + i, round_vec<T>(silu(load(gate + i))) * load(up + i));
  for (; i < size; ++i) {  // the tail, and every element of fp16 / fp64 rows
    const float g = static_cast<float>(gate[i]);
    const float activated = round_to<T>(g / (1.0f + std::exp(std::min(-g, 80.0f))));
    y[i] = static_cast<T>(activated * static_cast<float>(up[i]));
  }
}

template <typename T>
void silu_mul_rows(T* out, const T* gate_up, int64_t rows, int64_t size) {
  spindle_pool::parallel_for(0, rows, grain_rows(3 * size), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * size;
      silu_mul_row(out + r * size, gate, gate + size, size);
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
  const int64_t size = x.size(-1);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                        weight.data_ptr<scalar_t>(), x.numel() / size, size,
                        static_cast<float>(eps));
  });
  return out;
}

void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  check_rows(weight, "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual shapes differ");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "dtypes differ");
  const int64_t size = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                            weight.data_ptr<scalar_t>(), x.numel() / size, size,
                            static_cast<float>(eps));
  });
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_cache,
             const at::Tensor& sin_cache) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [tokens, heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k dtypes differ");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions");
  TORCH_CHECK(cos_cache.scalar_type() == at::kFloat && sin_cache.scalar_type() == at::kFloat &&
                  cos_cache.is_contiguous() && sin_cache.is_contiguous(),
              "the cos/sin caches must be contiguous float32");
  const int64_t dim = q.size(2);
  TORCH_CHECK(cos_cache.size(-1) == dim && k.size(2) == dim && dim % 2 == 0, "head_dim");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    for (at::Tensor* t : {&q, &k}) {
      rotate<scalar_t>(t->data_ptr<scalar_t>(), t->size(0), t->size(1), t->stride(0),
                       t->stride(1), dim, positions.data_ptr<int64_t>(),
                       cos_cache.data_ptr<float>(), sin_cache.data_ptr<float>());
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t size = gate_up.size(-1) / 2;
  auto shape = gate_up.sizes().vec();
  shape.back() = size;
  auto out = at::empty(shape, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(out.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(),
                            gate_up.numel() / (2 * size), size);
  });
  return out;
}
