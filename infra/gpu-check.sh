#!/usr/bin/env bash
# The checks that need a GPU machine, in one short run (about 2 minutes on an H100/H200):
# the Qwen2-VL rollout + GRPO step (its processor needs torchvision, which the CPU venv must
# not have), the GPU config's GRPO settings (bf16, gradient checkpointing) learning a toy task,
# the GRPO / LM-policy / served-training tests with TRL's update on CUDA (use_cpu is off when
# a GPU is present, so the model trains on the GPU and samples the next rollouts from there),
# in-process training of a pretrained model (its rollout copies load on the GPU), and the
# batched VLM sampling benchmark (benchmarks/vlm_sampling.py, its JSON written to OUT_DIR).
#
# On a machine with torch + torchvision + CUDA but without this project's other packages, put
# the missing wheels in .whl/ first (trl, datasets, duckdb, pytest-asyncio, and a transformers
# >= the one in .venv); they are installed to /tmp/site, never over the system's packages.
# Usage: bash infra/gpu-check.sh [OUT_DIR]
set -u
out=${1:-/tmp/maestro-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import importlib.metadata as md
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for d in ("torch", "torchvision", "transformers", "trl", "accelerate", "peft", "datasets", "pyarrow", "duckdb", "tokenizers"):
    try:
        print(f"{d}=={md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d}: missing")
PY
python3 -m pytest -p no:cacheprovider tests/test_vlm.py tests/test_grpo.py tests/test_lm_policy.py \
  tests/test_served_vlm.py tests/test_served_training.py tests/test_pretrained_learner.py \
  -q -rs --durations=8 --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
python3 benchmarks/vlm_sampling.py --out "$out" 2>&1 | tee "$out/vlm_sampling.log"
bench=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && exit "$bench"
exit "$rc"
