"""The GPU benchmark: mixed-32 through spindle's engine (flash-attn when it imports, else sdpa), with
its decode CUDA graphs and without (`enforce_eager`), and through transformers static batching
(padded `generate`, batches of 32), each warmed up on the workload first, on the same GPU in the
same run, with the model's shape from a config folder and random weights (the device machine
has no network and the demo checkpoint is too big to carry; throughput does not depend on the
values of the weights when every request generates exactly its max_tokens).

    python -m bench.gpu_bench --config-dir DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_bench import run_spindle
from bench.workloads import Workload, load_workload

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def random_model(config_dir: Path, dest: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, dest / name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=dtype)
    model.save_pretrained(dest)
    return dest


@torch.inference_mode()
def run_static_cuda(model, workload: Workload, batch_size: int = 32) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(workload.requests), batch_size):
        batch = workload.requests[first : first + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        new_tokens = max(r.max_tokens for r in batch)
        model.generate(
            input_ids=ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def spindle_run(folder: Path, dtype: str, workload: Workload, enforce_eager: bool) -> dict:
    """mixed-32 through spindle's engine, once to warm up (kernel loading, cuBLAS heuristics,
    the decode graphs' captures: what a server does before its first request) and once timed.
    Prefix caching is off so the timed pass computes every prompt again."""
    from worker.engine.llm import LLM

    longest = max(len(r.prompt_ids) + r.max_tokens for r in workload.requests)
    llm = LLM(
        str(folder),
        dtype=dtype,
        device="cuda",
        max_total_tokens=longest + 1,
        max_batch_size=64,
        max_batch_total_tokens=64 * (longest + 1),
        enable_prefix_caching=False,
        enforce_eager=enforce_eager,
    )
    run_spindle(llm, workload, "warmup")
    seconds, ttft, _ = run_spindle(llm, workload, "run")
    graphs = llm.engine.runner.decode_graphs
    result = {
        "backend": llm.engine.runner.backend.name,
        "cuda_graphs": graphs is not None and not graphs.disabled,
        "graphs_captured": len(graphs.graphs) if graphs is not None else 0,
        "seconds": seconds,
        "tok_s": workload.output_tokens / seconds,
        "ttft_p50_s": sorted(ttft)[len(ttft) // 2],
    }
    del llm
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-dir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="mixed-32")
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    workload = load_workload(args.workload)
    folder = random_model(args.config_dir, Path(tempfile.mkdtemp()) / "model", dtype)
    graphed = spindle_run(folder, args.dtype, workload, enforce_eager=False)
    eager = spindle_run(folder, args.dtype, workload, enforce_eager=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.cuda().eval()  # type: ignore[call-arg]  # transformers' stubs mistype .cuda
    run_static_cuda(model, workload)  # warm-up, as for spindle
    static_s = run_static_cuda(model, workload)
    tokens = workload.output_tokens
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "workload": workload.name,
        "output_tokens": tokens,
        "spindle": graphed,
        "spindle_eager": eager,
        "static_s": static_s,
        "static_tok_s": tokens / static_s,
        "ratio": static_s / graphed["seconds"],
        "ratio_eager": static_s / eager["seconds"],
    }
    args.out.write_text(json.dumps(result, indent=2))
    rows = [
        (f"spindle engine, CUDA graphs ({graphed['graphs_captured']})", graphed),
        ("spindle engine, eager", eager),
    ]
    lines = ["| system | backend | tok/s | seconds | TTFT p50 |", "|---|---|---|---|---|"]
    for name, run in rows:
        lines.append(
            f"| {name} | {run['backend']} | {run['tok_s']:.0f} | {run['seconds']:.2f} "
            f"| {run['ttft_p50_s']:.3f} |"
        )
    lines.append(
        f"| transformers static (batch 32) | sdpa | {tokens / static_s:.0f} | {static_s:.2f} | |"
    )
    lines.append(
        f"spindle / static: {result['ratio']:.2f}x graphs, {result['ratio_eager']:.2f}x eager, "
        f"on {result['device']} ({args.dtype}, {tokens} tokens)"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
