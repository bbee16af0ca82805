#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for the lent H100): GPU-marked tests,
# the CPU engine/LoRA tests re-run on CUDA (float32, Triton LoRA kernels), the kernel
# benchmark, the engine throughput benchmark and the HF+PEFT baseline beside it.
# Results go to $OUT (or .out/). Usage: bash scripts/gpu_suite.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1
what=${1:-all}
# Import loraplex from this tree without installing (the device machine has no package index).
pkg=$(mktemp -d); mkdir -p "$pkg/loraplex"; cp loraplex_pkg/*.py "$pkg/loraplex/"
for d in backend lora kernels gateway clients; do ln -s "$PWD/$d" "$pkg/loraplex/$d"; done
export PYTHONPATH="$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $what == tests || $what == all ]]; then
  kernels=${KERNELS:-tests/kernels}  # KERNELS= skips the kernel tests
  timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu $kernels tests/engine 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_engine_vs_hf.py \
    tests/lora/test_mixed_batches.py tests/lora/test_hotswap.py 2>&1 | tee "$OUT/cuda_engine_tests.log" | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  [[ -z ${SKIP_KERNEL_BENCH:-} ]] && timeout 400 python3 bench/lora_kernels.py 2>&1 | tee "$OUT/lora_kernels.log" | tail -22
  timeout 300 python3 bench/engine_throughput.py 2>&1 | tail -1 | tee "$OUT/engine.log"
  if [[ -f .gpu_carry/hf_peft_baseline.py ]]; then  # ../shared/bench/hf_peft_baseline.py, carried
    B=32 N=32 timeout 300 python3 .gpu_carry/hf_peft_baseline.py 2>&1 | tail -1 | tee "$OUT/hf_peft.log"
  fi
fi
