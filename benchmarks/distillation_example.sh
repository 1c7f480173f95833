#!/usr/bin/env bash
# The README's distillation worked example: a stronger SmolLM2 (the default run's checkpoint,
# held-out pass@1 ≈ 0.7) distilled into the untrained default model (≈ 0.3) by on-policy
# distillation (`opd`, exact per-token reverse KL) and by ExOPD (`exopd`, dense reward with
# λ = 1.25), the same number of steps each, on the default task. Prints each run's held-out
# pass@1/pass@4 before and after and its wall time. Long (tens of minutes on 2 CPU cores): run it
# alone, nothing else timing beside it.
set -euo pipefail
OUT=${OUT:-runs/distillation_example}
STEPS=${STEPS:-10}
DIVRL=${DIVRL:-.venv/bin/divrl}
TASK=(--set task=chain_sum --set "task_params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, allow_negation: false}"
      --set eval_size=64 --set eval_samples=4 --set max_new_tokens=32 --set lr=1.0e-5)
if [ ! -f "$OUT/teacher/checkpoints/step-20/config.json" ]; then
  "$DIVRL" train configs/default.yaml --set output_dir="$OUT/teacher"
fi
TEACHER="$OUT/teacher/checkpoints/step-20"
for recipe in opd exopd; do
  start=$(date +%s)
  "$DIVRL" train --recipe "$recipe" --set model=default --set teacher="$TEACHER" "${TASK[@]}" \
    --set steps="$STEPS" --set eval_every=0 --set checkpoint_every="$STEPS" --set output_dir="$OUT/$recipe"
  echo "$recipe: $(( $(date +%s) - start )) s wall"
done
for run in teacher opd exopd; do
  python3 - "$OUT/$run/metrics.jsonl" "$run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
evals = [r for r in rows if "eval_pass@1" in r]
b, a = evals[0], evals[-1]
print(f"{sys.argv[2]:8s} pass@1 {b['eval_pass@1']:.3f} ± {b['eval_pass@1_se']:.3f} → {a['eval_pass@1']:.3f} ± "
      f"{a['eval_pass@1_se']:.3f}; pass@4 {b['eval_pass@4']:.3f} → {a['eval_pass@4']:.3f} (step {a['step']})")
PY
done
