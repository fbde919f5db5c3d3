#!/usr/bin/env bash
# One prepared GPU check: on one H200 or H100 in under 8 minutes it builds the extension for the card,
# runs the ops and kernel tests natively, runs compute-sanitizer memcheck on small awkward cases, times every
# provider side by side with a correctness gate first (benchmarks/gpu/bench_driver.py), and runs the user's
# training commands for a few steps each. Results land under $OUT as they are produced (at most 8 files):
#   summary.json  each step's status and seconds      bench.json     the timing rows (rewritten after every row)
#   tests.log     pytest                              sanitizer.log  compute-sanitizer memcheck
#   train.log     deepspeed main / gen / cache / post  build.log      the extension build
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine (OUT defaults to /tmp/tokpost_gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run   # no GPU: the timing driver end to end on tiny shapes on the CPU
#
# Baselines and training dependencies the GPU image may lack travel as wheels in .whl/ (Python 3.12, manylinux;
# the device machine reaches no package index). Fetch them once on a machine that reaches PyPI, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0 \
#     flash-kmeans==0.3.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 torch-fidelity==0.4.0 lpips==0.1.4
#   python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8     # PyPI has only its sdist; this builds a py3 wheel
# (5.4 MB together.) Not carried: flash-attn (no binary wheel on PyPI: the SDPA attention path runs unless the image
# has it) and nvidia-dali-cuda130 (its wheel is far over the 64 MiB a device call carries: DALI runs only where the
# image has it). On the device tool: carry [".whl"]; the script installs them into /tmp/site itself.
set -uo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/tokpost_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" && $DRY_RUN == 1 ]] && PY="$ROOT/.venv/bin/python"
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)
STEPS=()

# step NAME LIMIT_S LOG CMD...: runs CMD with a time limit, appends its output to $OUT/LOG, records the outcome.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after ${secs}s" | tee -a "$OUT/$log"
  STEPS+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $secs, \"log\": \"$log\"}")
  write_summary
  return $rc
}

write_summary() {
  local joined
  joined=$(IFS=,; echo "${STEPS[*]:-}")
  cat >"$OUT/summary.json.tmp" <<EOF
{"dry_run": $DRY_RUN, "started_unix": $STARTED, "elapsed_s": $(( $(date +%s) - STARTED )), "host": "$(hostname)",
 "gpu": "$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null | head -1)",
 "steps": [$joined]}
EOF
  mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

if [[ $DRY_RUN == 1 ]]; then
  # Everything that needs no GPU: the driver's gates, timers, ceilings and JSON, on tiny CPU shapes.
  step dry-run-driver 300 build.log "$PY" benchmarks/gpu/bench_driver.py --device cpu --tiny \
    --out "$OUT/bench.json" --budget-s 120
  rc=$?
  echo "dry run done in $(( $(date +%s) - STARTED ))s: $OUT"
  exit $rc
fi

# 0. Carried wheels (see the header) and the environment.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/build.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && export PATH="/tmp/site/bin:$PATH"
fi
nvidia-smi >>"$OUT/build.log" 2>&1
"$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
import importlib, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())
for name in ("deepspeed", "vector_quantize_pytorch", "flash_kmeans", "flash_attn", "nvidia.dali", "lpips", "torch_fidelity"):
    try:
        importlib.import_module(name); print(name, "importable")
    except Exception as err:
        print(name, "NOT importable:", type(err).__name__, str(err)[:120])
EOF

# 1. Build the extension for this card only (sm_90 on Hopper), in place.
ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
step build 240 build.log env TOKPOST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
  "$PY" setup.py build_ext --inplace || { echo "build failed: see $OUT/build.log"; exit 1; }

# 2. Timings first (the most valuable output if a later step overruns): gate, do_bench, CUDA graphs, floor.
step bench 170 bench.log "$PY" benchmarks/gpu/bench_driver.py --device cuda --out "$OUT/bench.json" --budget-s 120

# 3. The ops and kernel tests, natively (TRITON_INTERPRET=0: compiled Triton, the CUDA backend).
step tests 120 tests.log env TRITON_INTERPRET=0 "$PY" -m pytest tests/ops tests/kernels -q -x -p no:cacheprovider \
  -k "cuda or triton or gpu" --timeout 60 -o addopts=""

# 4. compute-sanitizer memcheck on small awkward cases (needs the Firecracker runtime: on gVisor it refuses).
step sanitizer 90 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 3 \
  "$PY" benchmarks/gpu/sanitize_cases.py --backends cuda,triton

# 5. The user's commands, a few steps each: bf16 on one GPU over NCCL, DeepSpeed launcher, data backend auto
#    (DALI when installed), flash-attn or SDPA.
DATA=/tmp/tokpost_data
RUN=/tmp/tokpost_run
rm -rf "$RUN"
step data 60 train.log "$PY" -m tokpost_fast.data.embedded --out "$DATA"
COMMON=(--config configs/demo.yaml --run-dir "$RUN" --max-steps 3 --data-backend auto
        --set data.root="$DATA" --set train.precision=bf16 --set cache.num_images=64)
for stage in main gen cache post; do
  step "train-$stage" 90 train.log deepspeed --num_gpus 1 tokpost_fast/train.py --stage "$stage" "${COMMON[@]}" \
    || break
done
grep -iE "attention|dali|precision|nccl" "$OUT/train.log" | head -20
echo "gpu_check done in $(( $(date +%s) - STARTED ))s: $OUT"
"$PY" -c "import json; print(json.dumps(json.load(open('$OUT/summary.json'))['steps'], indent=0))"
