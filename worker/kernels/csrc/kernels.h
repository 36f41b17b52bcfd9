// The CPU kernels spindle builds on first use (worker/kernels/__init__.py); bindings.cpp
// exposes them to Python.
#pragma once

#include <torch/extension.h>

// Decode attention read in place from the head-major paged KV cache (paged_decode.cpp).
bool paged_decode_supports(int64_t head_dim);
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale);

// Prefill attention for all of a step's prompt chunks, read in place from the same cache after
// the step's K/V were written (paged_prefill.cpp); writes each chunk's rows of `out`.
bool paged_prefill_supports(int64_t head_dim, int64_t group);
void paged_prefill_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& block_tables,
                    const at::Tensor& q_starts, const at::Tensor& q_lens,
                    const at::Tensor& context_lens, double scale);
// The same on AMX tiles for bf16 (paged_prefill_amx.cpp); false, having done nothing, where this
// build, CPU, dtype or head_dim does not allow it.
bool paged_prefill_amx_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& block_tables,
                        const at::Tensor& q_starts, const at::Tensor& q_lens,
                        const at::Tensor& context_lens, double scale);

// A step's K/V rows into their cache slots, and the greedy argmax over float32 logits (rows.cpp).
void write_kv_cache_(at::Tensor& kv_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& slot_mapping);
at::Tensor argmax_rows(const at::Tensor& logits);

// Element-wise layers fused into one pass each (fused_ops.cpp), rounding where the eager torch
// code rounds so bf16 results match it.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_cache,
             const at::Tensor& sin_cache);
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// bf16 linear layers laid out for decode-sized batches: a [out, in] weight packed once
// (linear_bf16.cpp), then y = x Wᵀ + b from it on AMX tiles (linear_amx.cpp) or with the vector
// units — AVX512_BF16 dot products, else AVX2 FMAs on widened weights (linear_bf16.cpp) — each
// where this build and CPU allow it (`_supported`).
at::Tensor pack_linear_bf16(const at::Tensor& weight);
bool linear_amx_supported(int64_t out_features, int64_t in_features);
at::Tensor linear_amx(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias);
bool linear_bf16_supported(int64_t out_features, int64_t in_features);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                         const c10::optional<at::Tensor>& bias);
// The gate|up projection of a SiLU-gated MLP fused with its activation: the weight packed with
// gate and up column blocks alternating, and SiLU(x Gᵀ) * (x Uᵀ) from it, [.., intermediate].
at::Tensor pack_linear_bf16_gated(const at::Tensor& weight);
at::Tensor linear_amx_silu_mul(const at::Tensor& x, const at::Tensor& packed);
at::Tensor linear_bf16_silu_mul(const at::Tensor& x, const at::Tensor& packed);

// float32 linear layers with AVX-512 or AVX2 FMAs, laid out for streaming the weights
// (linear_f32.cpp).
bool linear_f32_supported(int64_t out_features, int64_t in_features);
at::Tensor pack_linear_f32(const at::Tensor& weight);
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed,
                      const c10::optional<at::Tensor>& bias);
// Its gate|up projection fused with SiLU-and-multiply, as for bf16 above.
at::Tensor pack_linear_f32_gated(const at::Tensor& weight);
at::Tensor linear_f32_silu_mul(const at::Tensor& x, const at::Tensor& packed);

// A Llama-family decoder stack calling the kernels above layer by layer (decoder.cpp): the
// Python class NativeDecoder.
void bind_native_decoder(pybind11::module& m);
