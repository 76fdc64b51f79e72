#!/usr/bin/env bash
# make gpu: everything a CUDA machine can check that a CPU cannot (issue 21), in one command, in about 8 minutes
# on an H100/H200. Each part runs even when an earlier one fails (no set -e), under its own time limit, and the
# end lists what failed; the exit status is the number of failed parts (0: all passed).
#   bench/gpu.sh                  # or: make gpu
#   DRY=1 bench/gpu.sh            # print the commands only
#   STEPS=10 PY=python3 bench/gpu.sh
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
STEPS=${STEPS:-10}
OUT=${OUT:-runs/gpu}
# the compiled kernels, not the interpreter: TRITON_INTERPRET must be off before anything imports triton
export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
failed=()

part() {  # part NAME SECONDS COMMAND...: run it, record a failure, go on
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  if [ -n "${DRY:-}" ]; then return 0; fi
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

# 1. the compiled-kernel tests on the GPU (and MeZO over a model spread across the CPU and the GPU), and every
# kernel compiled for sm_80/sm_90
part "compiled tests" 150 "$PY" -m pytest -q tests/test_fast.py tests/test_rules.py tests/test_optimizer.py -k cuda
part "kernels for sm_80/sm_90" 120 "$PY" fast/gpu_compile.py
part "ptx per element" 60 "$PY" bench/ptx.py

# 2. the tables: the perturbation's bandwidth; R at the default batch and at the paper's (16 x 256), float32 and
# bfloat16, LoRA and full (bench/step.py prints both modes)
part "bandwidth" 60 "$PY" bench/perturb.py --skip-reference
for dtype in float32 bfloat16; do
  part "R default $dtype" 90 "$PY" bench/step.py --device cuda --sizes 135m,1b --dtype "$dtype"
  part "R 16x256 $dtype" 90 "$PY" bench/step.py --device cuda --sizes 1b --dtype "$dtype" \
    --batch-size 16 --seq-len 256
done

# 3. the command line on CUDA: the reference against --fast, for LoRA, full bfloat16 --exact-restore and each rule
cli() {  # cli NAME FLAGS...: the reference and --fast runs of the same command, then their logs compared
  local name=$1
  shift
  local base=("$PY" mezo.py --task sst2 --steps "$STEPS" --eval-every 0 --eval-max-start 8 --device cuda "$@")
  part "cli $name reference" 120 "${base[@]}" --out "$OUT/$name-ref"
  part "cli $name --fast" 120 "${base[@]}" --fast --out "$OUT/$name-fast"
  part "cli $name compare" 30 "$PY" bench/compare_logs.py "$OUT/$name-ref" "$OUT/$name-fast"
}
[ -n "${DRY:-}" ] || rm -rf "$OUT"
cli lora
cli full-bf16-exact --mode full --dtype bfloat16 --exact-restore
for rule in momentum adam sign conservative; do
  cli "rule-$rule" --rule "$rule"
done

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "make gpu: every part passed"
else
  echo "make gpu: ${#failed[@]} part(s) failed:"
  printf '  %s\n' "${failed[@]}"
fi
exit ${#failed[@]}
