"""The GPU benchmark: mixed-32 through spindle's engine (flash-attn when it imports, else sdpa) and
through transformers static batching (padded `generate`, batches of 32), on the same GPU in the
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-dir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="mixed-32")
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from worker.engine.llm import LLM

    dtype = getattr(torch, args.dtype)
    workload = load_workload(args.workload)
    folder = random_model(args.config_dir, Path(tempfile.mkdtemp()) / "model", dtype)
    longest = max(len(r.prompt_ids) + r.max_tokens for r in workload.requests)
    llm = LLM(
        str(folder),
        dtype=args.dtype,
        device="cuda",
        max_total_tokens=longest + 1,
        max_batch_size=64,
        max_batch_total_tokens=64 * (longest + 1),
    )
    run_spindle(llm, load_workload("single"), "warmup")
    spindle_s, ttft, _ = run_spindle(llm, workload, "run")
    backend = llm.engine.runner.backend.name
    del llm
    torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.cuda().eval()  # type: ignore[call-arg]  # transformers' stubs mistype .cuda
    run_static_cuda(model, load_workload("single"))
    static_s = run_static_cuda(model, workload)
    tokens = workload.output_tokens
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "workload": workload.name,
        "output_tokens": tokens,
        "attention_backend": backend,
        "spindle_s": spindle_s,
        "spindle_tok_s": tokens / spindle_s,
        "spindle_ttft_p50_s": sorted(ttft)[len(ttft) // 2],
        "static_s": static_s,
        "static_tok_s": tokens / static_s,
        "ratio": static_s / spindle_s,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"| system | backend | tok/s | seconds |\n|---|---|---|---|\n"
        f"| spindle engine | {backend} | {result['spindle_tok_s']:.0f} | {spindle_s:.2f} |\n"
        f"| transformers static (batch 32) | sdpa | {result['static_tok_s']:.0f} | {static_s:.2f} |\n"
        f"ratio spindle / static: {result['ratio']:.2f}x on {result['device']} ({args.dtype}, {tokens} tokens)"
    )


if __name__ == "__main__":
    main()
