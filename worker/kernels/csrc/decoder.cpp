// A Llama-family decoder stack run layer by layer in C++: the same kernel calls, in the same
// order and on the same tensors, as the Python modules make (worker/models/llama.py with the
// sdpa backend's native paths), without the Python between them.
//
// A 32-row bf16 decode step on a 2-core Zen 4 spent 5.1 of its 40.7 ms outside the kernels, ~3
// of them in the modules' Python (a ~100 us per layer: module calls, views, checks), slowed by
// the step's ~0.3-1 GB of weights and K/V evicting the interpreter's data from the caches.
// Here one call runs every layer with the GIL released. The Python side
// (worker/engine/native_decoder.py) decides which models and steps qualify and hands over the
// weights once.
#include "kernels.h"

#include <string>
#include <vector>

namespace {

enum class LinearKind { kAmx, kBf16, kF32 };

LinearKind linear_kind(const std::string& name) {
  if (name == "amx") return LinearKind::kAmx;
  if (name == "bf16") return LinearKind::kBf16;
  TORCH_CHECK(name == "f32", "unknown native linear '", name, "'");
  return LinearKind::kF32;
}

struct NativeLinearWeight {
  at::Tensor packed;
  c10::optional<at::Tensor> bias;  // added inside the product (the column-parallel layers)
  at::Tensor bias_after;           // added to the product's output (row-parallel), or undefined
  LinearKind kind;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case LinearKind::kAmx: y = linear_amx(x, packed, bias); break;
      case LinearKind::kBf16: y = linear_bf16(x, packed, bias); break;
      case LinearKind::kF32: y = linear_f32(x, packed, bias); break;
    }
    return bias_after.defined() ? y + bias_after : y;
  }

  at::Tensor silu_mul(const at::Tensor& x) const {
    switch (kind) {
      case LinearKind::kAmx: return linear_amx_silu_mul(x, packed);
      case LinearKind::kBf16: return linear_bf16_silu_mul(x, packed);
      case LinearKind::kF32: return linear_f32_silu_mul(x, packed);
    }
    TORCH_CHECK(false, "unreachable");
  }
};

NativeLinearWeight linear_weight(const at::Tensor& packed, const std::string& kind,
                                 const c10::optional<at::Tensor>& bias, bool bias_inside) {
  NativeLinearWeight weight{packed, c10::nullopt, at::Tensor(), linear_kind(kind)};
  if (bias.has_value() && bias->defined()) {
    if (bias_inside) {
      weight.bias = bias;
    } else {
      weight.bias_after = *bias;
    }
  }
  return weight;
}

struct DecoderLayer {
  at::Tensor input_norm, post_attention_norm;
  NativeLinearWeight qkv, o, gate_up, down;
  at::Tensor kv_cache, k_cache, v_cache, cos_cache, sin_cache;
  at::Tensor q_norm, k_norm;  // Qwen3's RMSNorm over each query / key head, or undefined
};

// RMSNorm of each head of a [tokens, heads, head_dim] view of the fused projection, as RMSNorm
// does it (worker/layers/norm.py), so the result is the same bit for bit: the fused kernel where
// the view is contiguous (one token), else torch's ops.
at::Tensor head_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.is_contiguous() && x.scalar_type() == weight.scalar_type()) {
    return rms_norm(x, weight, eps);
  }
  at::Tensor x32 = x.to(at::kFloat);
  x32 = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * x32.to(x.scalar_type());
}

// The sdpa backend's write_cache: the native kernel for K and V rows with their heads packed
// and one row stride, else index_copy_ per cache (after Qwen3's norms K is its own tensor).
void write_kv(at::Tensor kv_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  const auto heads_packed = [](const at::Tensor& x) {
    return x.stride(-1) == 1 && x.stride(-2) == x.size(-1);
  };
  if (heads_packed(k) && heads_packed(v) && k.stride(0) == v.stride(0)) {
    write_kv_cache_(kv_cache, k, v, slot_mapping);
    return;
  }
  const int64_t kv_heads = kv_cache.size(1), head_dim = kv_cache.size(-1);
  kv_cache.select(0, 0).view({kv_heads, -1, head_dim}).index_copy_(1, slot_mapping,
                                                                  k.transpose(0, 1));
  kv_cache.select(0, 1).view({kv_heads, -1, head_dim}).index_copy_(1, slot_mapping,
                                                                  v.transpose(0, 1));
}

}  // namespace

namespace {

class NativeDecoder {
 public:
  NativeDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                double scale, at::Tensor final_norm)
      : num_heads_(num_heads),
        num_kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        eps_(eps),
        scale_(scale),
        final_norm_(std::move(final_norm)) {}

  // One layer's weights, as its modules hold them: packed linear weights with the name of their
  // kernel ("amx", "bf16", "f32"), the norms' weights, the layer's KV cache
  // ([2, kv_heads, blocks, block_size, head_dim]), its rotary tables and, for Qwen3, the weights
  // of its per-head q and k norms (same eps as the others).
  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_attention_norm,
                 const at::Tensor& qkv, const std::string& qkv_kind,
                 const c10::optional<at::Tensor>& qkv_bias, const at::Tensor& o,
                 const std::string& o_kind, const c10::optional<at::Tensor>& o_bias,
                 const at::Tensor& gate_up, const std::string& gate_up_kind,
                 const at::Tensor& down, const std::string& down_kind,
                 const c10::optional<at::Tensor>& down_bias, const at::Tensor& kv_cache,
                 const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                 const c10::optional<at::Tensor>& q_norm,
                 const c10::optional<at::Tensor>& k_norm) {
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, "a head-major paged KV cache");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
    layers_.push_back(DecoderLayer{
        input_norm, post_attention_norm, linear_weight(qkv, qkv_kind, qkv_bias, true),
        linear_weight(o, o_kind, o_bias, false),
        linear_weight(gate_up, gate_up_kind, c10::nullopt, false),
        linear_weight(down, down_kind, down_bias, false), kv_cache, kv_cache.select(0, 0),
        kv_cache.select(0, 1), cos_cache, sin_cache,
        q_norm.has_value() ? *q_norm : at::Tensor(), k_norm.has_value() ? *k_norm : at::Tensor()});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // The stack over one step's embedded tokens, `hidden` [tokens, hidden_size]: the first
  // `num_decodes` rows are decodes (decode_tables / decode_lens describe them), the rest prompt
  // chunks (prefill_* as the sdpa backend's PrefillTables). Returns the final-normed hidden of
  // every row or, given `sampled_rows` (with their decode-style tables and context lengths), of
  // those rows only: the last layer stores every row's K/V but runs the rest on them alone, as
  // LlamaModel does with SampledRows.
  at::Tensor forward(at::Tensor hidden, const at::Tensor& positions,
                     const at::Tensor& slot_mapping, int64_t num_decodes,
                     const c10::optional<at::Tensor>& decode_tables,
                     const c10::optional<at::Tensor>& decode_lens,
                     const c10::optional<at::Tensor>& prefill_tables,
                     const c10::optional<at::Tensor>& prefill_starts,
                     const c10::optional<at::Tensor>& prefill_lens,
                     const c10::optional<at::Tensor>& prefill_context_lens,
                     const c10::optional<at::Tensor>& sampled_rows,
                     const c10::optional<at::Tensor>& sampled_tables,
                     const c10::optional<at::Tensor>& sampled_lens) {
    const int64_t tokens = hidden.size(0);
    const bool decodes_only = num_decodes == tokens;
    TORCH_CHECK(num_decodes == 0 || (decode_tables.has_value() && decode_lens.has_value()),
                "decode rows need their block tables and context lengths");
    TORCH_CHECK(decodes_only || (prefill_tables.has_value() && prefill_starts.has_value() &&
                                 prefill_lens.has_value() && prefill_context_lens.has_value()),
                "prompt rows need their prefill tables");
    const auto tensor = [](const c10::optional<at::Tensor>& t) {
      return t.has_value() ? *t : at::Tensor();
    };
    const Step step{positions,           slot_mapping,          num_decodes,
                    decodes_only,        tensor(decode_tables), tensor(decode_lens),
                    tensor(prefill_tables), tensor(prefill_starts), tensor(prefill_lens),
                    tensor(prefill_context_lens)};
    const Sampled sampled{sampled_rows.has_value(), tensor(sampled_rows), tensor(sampled_tables),
                          tensor(sampled_lens)};
    TORCH_CHECK(!sampled.only || (sampled.tables.defined() && sampled.lens.defined()) ||
                    sampled.rows.numel() == 0,
                "sampled rows need their block tables and context lengths");
    at::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecoderLayer& layer = layers_[i];
      if (i == 0) {
        residual = hidden;
        hidden = rms_norm(hidden, layer.input_norm, eps_);
      } else {
        add_rms_norm_(hidden, residual, layer.input_norm, eps_);
      }
      at::Tensor attended;
      if (sampled.only && i + 1 == layers_.size()) {
        attended = sampled_attention(layer, hidden, step, sampled);
        residual = residual.index_select(0, sampled.rows);
        if (sampled.rows.numel() == 0) return residual;
      } else {
        attended = attention(layer, hidden, step);
      }
      hidden = layer.o(attended.reshape({attended.size(0), num_heads_ * head_dim_}));
      add_rms_norm_(hidden, residual, layer.post_attention_norm, eps_);
      hidden = layer.down(layer.gate_up.silu_mul(hidden));
    }
    add_rms_norm_(hidden, residual, final_norm_, eps_);
    return hidden;
  }

 private:
  struct Step {  // what every layer's attention reads of the step
    at::Tensor positions, slot_mapping;
    int64_t num_decodes;
    bool decodes_only;
    at::Tensor decode_tables, decode_lens;
    at::Tensor prefill_tables, prefill_starts, prefill_lens, prefill_context_lens;
  };

  struct Sampled {  // the rows the last layer runs on past its K/V (SampledRows)
    bool only;
    at::Tensor rows, tables, lens;
  };

  // The queries of a layer's step, after its K/V went to the cache.
  at::Tensor project_and_store(const DecoderLayer& layer, const at::Tensor& hidden,
                               const Step& step) const {
    const int64_t tokens = hidden.size(0);
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    const at::Tensor qkv = layer.qkv(hidden);
    at::Tensor q = qkv.narrow(-1, 0, q_size).view({tokens, num_heads_, head_dim_});
    at::Tensor k = qkv.narrow(-1, q_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
    const at::Tensor v =
        qkv.narrow(-1, q_size + kv_size, kv_size).view({tokens, num_kv_heads_, head_dim_});
    if (layer.q_norm.defined()) {
      q = head_rms_norm(q, layer.q_norm, eps_);
      k = head_rms_norm(k, layer.k_norm, eps_);
    }
    rotary_(q, k, step.positions, layer.cos_cache, layer.sin_cache);
    write_kv(layer.kv_cache, k, v, step.slot_mapping);
    return q;
  }

  // The last layer's attention for the sampled rows alone, each a one-token query against its
  // sequence's cache (the sdpa backend's decode path on the SampledRows metadata).
  at::Tensor sampled_attention(const DecoderLayer& layer, const at::Tensor& hidden,
                               const Step& step, const Sampled& sampled) const {
    const at::Tensor q = project_and_store(layer, hidden, step).index_select(0, sampled.rows);
    if (sampled.rows.numel() == 0) return q;
    return paged_decode(q, layer.k_cache, layer.v_cache, sampled.tables, sampled.lens, scale_);
  }

  // As LlamaAttention.forward with the sdpa backend's native paths: q/k/v views of the fused
  // projection, rotary in place, the K/V written to the cache, then decode attention for the
  // decode rows and the prefill kernel for the prompt rows.
  at::Tensor attention(const DecoderLayer& layer, const at::Tensor& hidden,
                       const Step& step) const {
    const int64_t tokens = hidden.size(0);
    const at::Tensor q = project_and_store(layer, hidden, step);
    if (step.decodes_only) {
      return paged_decode(q, layer.k_cache, layer.v_cache, step.decode_tables, step.decode_lens,
                          scale_);
    }
    at::Tensor out = at::empty({tokens, num_heads_, head_dim_}, q.options());
    if (step.num_decodes > 0) {
      out.narrow(0, 0, step.num_decodes)
          .copy_(paged_decode(q.narrow(0, 0, step.num_decodes), layer.k_cache, layer.v_cache,
                              step.decode_tables, step.decode_lens, scale_));
    }
    paged_prefill_(out, q, layer.k_cache, layer.v_cache, step.prefill_tables,
                   step.prefill_starts, step.prefill_lens, step.prefill_context_lens, scale_);
    return out;
  }

  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor final_norm_;
  std::vector<DecoderLayer> layers_;
};

}  // namespace

void bind_native_decoder(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<NativeDecoder>(m, "NativeDecoder",
                            "a Llama-family decoder stack run in C++ (decoder.cpp)")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("final_norm"))
      .def("add_layer", &NativeDecoder::add_layer)
      .def("num_layers", &NativeDecoder::num_layers)
      .def("forward", &NativeDecoder::forward, py::call_guard<py::gil_scoped_release>());
}
