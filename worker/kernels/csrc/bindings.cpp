// The Python module of spindle's CPU kernels (see kernels.h).
#include "kernels.h"
#include "pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention");
  m.def("paged_decode_supports", &paged_decode_supports, "the head_dim values it handles");
  m.def("paged_prefill_", &paged_prefill_, "paged causal prefill attention of a step's chunks");
  m.def("paged_prefill_supports", &paged_prefill_supports, "head_dim/block_size it handles");
  m.def("write_kv_cache_", &write_kv_cache_, "write a step's K/V rows into their cache slots");
  m.def("argmax_rows", &argmax_rows, "index of each row's first largest value (float32)");
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; x = RMSNorm(residual), in place");
  m.def("rotary_", &rotary_, "rotary position embedding of q and k, in place (neox layout)");
  m.def("pack_linear_bf16", &pack_linear_bf16,
        "a bf16 [out, in] weight in the layout linear_amx and linear_dpbf16 read");
  m.def("pack_linear_bf16_gated", &pack_linear_bf16_gated,
        "a bf16 [2 x intermediate, in] gate|up weight, gate and up column blocks alternating");
  m.def("linear_amx_supported", &linear_amx_supported, "whether linear_amx takes this weight");
  m.def("linear_amx", &linear_amx, "y = x W^T + b on AMX tiles from a packed bf16 weight",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("linear_amx_silu_mul", &linear_amx_silu_mul,
        "SiLU(x G^T) * (x U^T) on AMX tiles from a weight packed by pack_linear_bf16_gated");
  m.def("linear_dpbf16_supported", &linear_dpbf16_supported,
        "whether linear_dpbf16 takes this weight");
  m.def("linear_dpbf16", &linear_dpbf16,
        "y = x W^T + b with AVX512_BF16 dot products from a packed bf16 weight", py::arg("x"),
        py::arg("packed"), py::arg("bias") = py::none());
  m.def("linear_dpbf16_silu_mul", &linear_dpbf16_silu_mul,
        "SiLU(x G^T) * (x U^T) with AVX512_BF16 dot products, weight from pack_linear_bf16_gated");
  m.def("linear_f32_supported", &linear_f32_supported, "whether linear_f32 takes this weight");
  m.def("pack_linear_f32", &pack_linear_f32, "a float32 [out, in] weight in linear_f32's layout");
  m.def("linear_f32", &linear_f32, "y = x W^T + b with AVX-512 FMAs from a packed fp32 weight",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("pack_linear_f32_gated", &pack_linear_f32_gated,
        "a float32 [2 x intermediate, in] gate|up weight, gate and up column blocks alternating");
  m.def("linear_f32_silu_mul", &linear_f32_silu_mul,
        "SiLU(x G^T) * (x U^T) with AVX-512 FMAs from a weight packed by pack_linear_f32_gated");
  m.def("configure_pool", &spindle_pool::configure,
        "run the kernels on spindle's own threads (threads >= 2) or torch's (0)",
        py::arg("threads"), py::arg("speculate_all") = false, py::arg("spin_us") = 200);
  m.def("pool_stats", &spindle_pool::stats,
        "regions, helper items, items computed twice, helper sleeps since the process started");
  m.def("pool_threads", &spindle_pool::threads, "the pool's threads, 0 when it is off");
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up over a fused gate|up tensor");
}
