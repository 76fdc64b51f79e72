#!/usr/bin/env bash
# The first 3 steps of the default run and four variants, on an earlier commit and on this working tree, compared
# with == (loss_plus, loss_minus, projected_grad, seed): a refactor that says "behaviour does not change" shows it.
#
#   bash bench/same_steps.sh f962a6e            # CPU, 1 thread a run, two runs at a time; ~10 min on 2 cores
#
# Each run is stopped once its log holds 3 steps (the full test evaluation at the end is skipped).
set -u
REF=${1:?usage: bash bench/same_steps.sh COMMIT}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mktemp -d /tmp/same_steps.XXXX)
git -C "$HERE" worktree add -q --detach "$OUT/ref" "$REF" || exit 2
trap 'git -C "$HERE" worktree remove --force "$OUT/ref"' EXIT
CONFIGS=(
  "default|"
  "fast|--fast"
  "momentum|--rule momentum"
  "full-bf16-exact|--mode full --fast --exact-restore --dtype bfloat16"
  "dp2|--dp 2"
)
three() {  # NAME DIR FLAGS...: run until the log has 3 steps
  local name=$1 dir=$2; shift 2
  local launch=(python mezo.py)
  [[ " $* " == *" --dp 2 "* ]] && launch=(torchrun --standalone --nproc-per-node 2 mezo.py)
  (cd "$dir" && OMP_NUM_THREADS=1 exec timeout 1200 "${launch[@]}" --task sst2 --device cpu --threads 1 \
     --steps 400 --eval-every 0 --eval-max-start 8 --out "$OUT/$name" "$@" > "$OUT/$name.stdout" 2>&1) &
  local pid=$!
  until [ "$(grep -c loss_plus "$OUT/$name/log.jsonl" 2>/dev/null)" -ge 3 ] 2>/dev/null; do
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  pkill -f -- "--out $OUT/$name( |$)"; wait $pid 2>/dev/null
}
status=0
for c in "${CONFIGS[@]}"; do
  name=${c%%|*}; read -r -a flags <<< "${c#*|}"
  if [ "$name" = dp2 ]; then  # two processes each: one pair at a time
    three "ref-$name" "$OUT/ref" "${flags[@]}"; three "new-$name" "$HERE" "${flags[@]}"
  else
    three "ref-$name" "$OUT/ref" "${flags[@]}" & three "new-$name" "$HERE" "${flags[@]}" & wait
  fi
  python - "$OUT/ref-$name/log.jsonl" "$OUT/new-$name/log.jsonl" "$name" <<'PY' || status=1
import json, sys
def steps(path):
    keys = ("step", "seed", "loss_plus", "loss_minus", "projected_grad")
    try:
        records = [json.loads(line) for line in open(path) if line.strip()]
    except OSError:
        return []
    return [{k: r[k] for k in keys} for r in records if "loss_plus" in r][:3]
a, b = steps(sys.argv[1]), steps(sys.argv[2])
same = len(a) == 3 and a == b
print(f"{sys.argv[3]:16s} {'EQUAL' if same else 'DIFFER'}  step 3: {b[-1] if b else None}")
sys.exit(0 if same else 1)
PY
done
exit $status
