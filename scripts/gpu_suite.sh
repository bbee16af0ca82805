#!/usr/bin/env bash
# Everything that needs a GPU, in few calls (for the lent H200): GPU-marked tests, the CPU
# engine/LoRA parity tests re-run on CUDA, the kernel and engine benchmarks with their floors,
# the nano-vllm workload, the HF+PEFT baseline and the served-path benchmark.
# Results go to $OUT (or .out/) and bench/results/.
# Usage: bash scripts/gpu_suite.sh [tests|bench|serve|profile|gemv|quick|all]
#        PLAN=scripts/gpu_plans/FILE bash scripts/gpu_suite.sh plan   # one step per line: NAME SECONDS COMMAND
# quick: the least that proves a round on a short device budget: GPU kernel tests (QUICK_TESTS), engine
# cases QUICK_CASES, the GEMM sweep writing its table (QUICK_SWEEP: its arguments), engine cases
# QUICK_CASES_B (after the sweep), nano-vllm.
# Missing Python packages travel as wheels in .whl/ (bash scripts/gpu_wheels.sh fills it); ../shared/bench in .gpu_carry/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT" bench/results; export OUT PYTHONUNBUFFERED=1
what=${1:-all}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# Import loraplex from this tree without installing (the device machine has no package index).
pkg=$(mktemp -d); mkdir -p "$pkg/loraplex"; cp loraplex_pkg/*.py "$pkg/loraplex/"
for d in backend lora kernels gateway clients; do ln -s "$PWD/$d" "$pkg/loraplex/$d"; done
export PYTHONPATH="$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$pkg/bin"; printf '#!/bin/sh\nexec python3 -m loraplex.backend.cli "$@"\n' > "$pkg/bin/loraplex"
chmod +x "$pkg/bin/loraplex"; export PATH="$pkg/bin:$PATH"
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# LOG=FILE: every step appends to $OUT/FILE (few files come back) instead of $OUT/NAME.log
step() { local name=$1 limit=$2; shift 2; echo "== $name" | tee ${LOG:+-a "$OUT/$LOG"}
  timeout "$limit" "$@" 2>&1 | tee ${LOG:+-a} "$OUT/${LOG:-$name.log}" | tail -${TAIL:-12}; }
if [[ $what == tests || $what == all ]]; then
  step gpu_tests 300 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" -m gpu ${KERNELS-tests/kernels} tests/engine
  step cuda_engine_tests 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_engine_vs_hf.py \
    tests/lora/test_mixed_batches.py tests/lora/test_hotswap.py ${EXTRA_TESTS:-}
fi
if [[ $what == bench || $what == all ]]; then
  [[ -n ${KERNEL_BENCH:-} ]] && step attention_kernels 200 python3 bench/attention_kernels.py
  TAIL=20 step engine 420 python3 bench/engine_throughput.py ${CASES:+--cases $CASES} ${PROFILE:+--profile} \
    ${ENGINE_OUT:+--out $ENGINE_OUT}
  if [[ -f .gpu_carry/nano_vllm_workload.py ]]; then  # ../shared/bench, carried
    step nano_vllm 300 python3 .gpu_carry/nano_vllm_workload.py
    cp "$OUT/nano_vllm.log" bench/results/nano_vllm_workload.log 2>/dev/null
  fi
  [[ -n ${HF_BASELINE:-} && -f .gpu_carry/hf_peft_baseline.py ]] && B=32 N=32 step hf_peft 300 python3 .gpu_carry/hf_peft_baseline.py
fi
if [[ $what == profile ]]; then  # where a step's time goes (bench/profile_engine.py), then any CASES
  TAIL=${TAIL:-150} step profile 400 python3 bench/profile_engine.py ${PROFILE_ARGS:-}
  [[ -n ${CASES:-} ]] && TAIL=20 step engine 420 python3 bench/engine_throughput.py --cases "$CASES" --out "${ENGINE_OUT:-engine_cases.json}"
fi
if [[ $what == quick ]]; then  # each step's JSON reaches $OUT as soon as it is written
  step gpu_kernel_tests ${QUICK_TEST_S:-75} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu ${QUICK_TESTS:-tests/kernels}
  TAIL=30 step engine_a ${QUICK_ENGINE_S:-130} python3 bench/engine_throughput.py --graphs-only \
    --cases "${QUICK_CASES:-structured,lora}" --out engine_quick_a.json
  [[ -n ${QUICK_SWEEP:-} ]] && TAIL=30 step sweep ${QUICK_SWEEP_S:-50} python3 bench/gemv_sweep.py --write-table $QUICK_SWEEP
  [[ -n ${QUICK_CASES_B:-} ]] && TAIL=30 step engine_b ${QUICK_ENGINE_B_S:-70} python3 bench/engine_throughput.py \
    --graphs-only --cases "$QUICK_CASES_B" --out engine_quick_b.json
  [[ -f .gpu_carry/nano_vllm_workload.py ]] && step nano_vllm ${QUICK_NANO_S:-90} python3 .gpu_carry/nano_vllm_workload.py
fi
if [[ $what == gemv ]]; then  # decode with the checked-in skinny-GEMM table, tune it here (copy in $OUT), decode again
  TAIL=20 step engine_before 200 python3 bench/engine_throughput.py --cases "${CASES:-decode1}" --out engine_gemv_before.json
  TAIL=80 step gemv_sweep 300 python3 bench/gemv_sweep.py --write-table ${GEMV_ARGS:-}
  TAIL=20 step engine_after 200 python3 bench/engine_throughput.py --cases "${CASES:-decode1}" --out engine_gemv_after.json
fi
if [[ $what == serve || $what == all ]]; then
  [[ -f bench/serve_throughput.py ]] && step serve_throughput 400 python3 bench/serve_throughput.py
  TAIL=40 step served_vs_engine 500 python3 bench/served_vs_engine.py --shape qwen3-0.6b ${SERVED_ARGS:-}
  [[ -n ${SERVE_SUITE:-} ]] && step serve_suite 500 bash bench/serve_suite.sh --suite "$SERVE_SUITE"
fi
if [[ $what == plan ]]; then  # steps from $PLAN, in order (a session's calls, written down before they run)
  while read -r -u 3 name limit cmd; do
    [[ -z ${name:-} || $name == \#* ]] && continue
    TAIL=${TAIL:-30} step "$name" "$limit" bash -c "$cmd" </dev/null
  done 3<"$PLAN"
fi
# only what this call wrote comes back ($OUT returns at most 8 files)
find bench/results -name '*.json' -newer "$pkg" -exec cp {} "$OUT/" \; 2>/dev/null
true
