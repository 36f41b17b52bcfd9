// The Python module of spindle's CPU kernels (see kernels.h).
#include "kernels.h"
#include "pool.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The compute kernels let go of the GIL while they run, as torch's own ops do, so a Python
  // thread (the worker's publisher, worker/publisher.py) runs during a step's kernels instead of
  // waiting for the engine's thread to reach a torch op or the 5 ms switch interval: a thread's
  // 1 ms sleeps during decode woke p90 2.0 ms (max 15 ms) late before, 0.11 ms (max 5-7) after.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode", &paged_decode, nogil, "paged decode attention");
  m.def("paged_decode_supports", &paged_decode_supports, "the head_dim values it handles");
  m.def("paged_prefill_", &paged_prefill_, nogil,
        "paged causal prefill attention of a step's chunks");
  m.def("paged_prefill_supports", &paged_prefill_supports, "head_dim/block_size it handles");
  m.def("write_kv_cache_", &write_kv_cache_, nogil,
        "write a step's K/V rows into their cache slots");
  m.def("argmax_rows", &argmax_rows, nogil, "index of each row's first largest value (float32)");
  m.def("rms_norm", &rms_norm, nogil, "RMSNorm");
  m.def("add_rms_norm_", &add_rms_norm_, nogil, "residual += x; x = RMSNorm(residual), in place");
  m.def("rotary_", &rotary_, nogil, "rotary position embedding of q and k, in place (neox layout)");
  m.def("pack_linear_bf16", &pack_linear_bf16, nogil,
        "a bf16 [out, in] weight in the layout linear_amx and linear_bf16 read");
  m.def("pack_linear_bf16_gated", &pack_linear_bf16_gated, nogil,
        "a bf16 [2 x intermediate, in] gate|up weight, gate and up column blocks alternating");
  m.def("linear_amx_supported", &linear_amx_supported, "whether linear_amx takes this weight");
  m.def("linear_amx", &linear_amx, nogil, "y = x W^T + b on AMX tiles from a packed bf16 weight",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("linear_amx_silu_mul", &linear_amx_silu_mul, nogil,
        "SiLU(x G^T) * (x U^T) on AMX tiles from a weight packed by pack_linear_bf16_gated");
  m.def("linear_bf16_supported", &linear_bf16_supported,
        "whether linear_bf16 takes this weight");
  m.def("linear_bf16", &linear_bf16, nogil,
        "y = x W^T + b with AVX512_BF16 dot products or AVX2 FMAs from a packed bf16 weight", py::arg("x"),
        py::arg("packed"), py::arg("bias") = py::none());
  m.def("linear_bf16_silu_mul", &linear_bf16_silu_mul, nogil,
        "SiLU(x G^T) * (x U^T) on the vector units, weight from pack_linear_bf16_gated");
  m.def("linear_f32_supported", &linear_f32_supported, "whether linear_f32 takes this weight");
  m.def("pack_linear_f32", &pack_linear_f32, nogil,
        "a float32 [out, in] weight in linear_f32's layout");
  m.def("linear_f32", &linear_f32, nogil,
        "y = x W^T + b with AVX-512 or AVX2 FMAs from a packed fp32 weight",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("pack_linear_f32_gated", &pack_linear_f32_gated, nogil,
        "a float32 [2 x intermediate, in] gate|up weight, gate and up column blocks alternating");
  m.def("linear_f32_silu_mul", &linear_f32_silu_mul, nogil,
        "SiLU(x G^T) * (x U^T) with FMAs from a weight packed by pack_linear_f32_gated");
  m.def("configure_pool", &spindle_pool::configure,
        "run the kernels on spindle's own threads (threads >= 2) or torch's (0)",
        py::arg("threads"), py::arg("speculate_all") = false, py::arg("spin_us") = 200);
  m.def("pool_stats", &spindle_pool::stats,
        "regions, helper items, items computed twice, helper sleeps since the process started");
  m.def("pool_threads", &spindle_pool::threads, "the pool's threads, 0 when it is off");
  m.def("silu_and_mul", &silu_and_mul, nogil, "SiLU(gate) * up over a fused gate|up tensor");
  bind_native_decoder(m);
}
