#!/usr/bin/env bash
# The GPU check, for a CUDA machine (the device machine: torch, transformers, triton; no network).
# Runs the engine's exactness tests on CUDA (flash-attn backend when it imports, else sdpa) and the
# mixed-32 benchmark against transformers static batching, and prints a short table. ~3-5 minutes.
# Full logs go to $OUT (or /tmp): gpu_tests.log, gpu_bench.log, gpu_bench.json.
#   bench/gpu_check.sh [CONFIG_DIR]   (CONFIG_DIR: config.json + tokenizer files of the model to
#                                     shape the benchmark after; default .gpu_assets/smollm2)
# Prepare CONFIG_DIR here (the device machine has neither network nor the demo model), then send
# it with the device tool's carry=[".gpu_assets"]:
#   mkdir -p .gpu_assets/smollm2 && cp "$(.venv/bin/spindle model demo | tail -1)"/{config.json,\
#       tokenizer.json,tokenizer_config.json,generation_config.json} .gpu_assets/smollm2/
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
config_dir="${1:-.gpu_assets/smollm2}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__, '-> flash backend')" 2>/dev/null \
    || echo "flash-attn: not importable -> sdpa backend"

echo "== exactness on CUDA (greedy vs transformers, staggered arrivals, preemption)"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu -s 2>&1 | tee "$out/gpu_tests.log" \
    | grep -E "backend=|passed|failed|skipped|Error|assert" | tail -20

echo "== mixed-32: spindle engine vs transformers static batching (same GPU, same run)"
python3 -m bench.gpu_bench --config-dir "$config_dir" --out "$out/gpu_bench.json" 2>&1 \
    | tee "$out/gpu_bench.log" | grep -vE "Warning|warn" | tail -8
