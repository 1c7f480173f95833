#!/usr/bin/env bash
# The README's study (issue 9): GRPO on a task the default model is far from saturating
# (reasoning-gym chain_sum, 3 one-digit terms; base pass@1 ≈ 0.03 at T = 1), trained three ways
# with the same steps, seed and data — an exact reverse-KL penalty KL(πθ‖π_ref), an exact
# forward-KL penalty KL(π_ref‖πθ), both β = $BETA, and no KL — then each model and the base
# evaluated by `divrl eval` at n = $N samples on $PROMPTS distinct held-out prompts, and
# `divrl compare` of the four. Every part is skipped when its output exists and a training
# resumes from its last checkpoint (every 5 steps), so an interrupted study continues where it
# stopped; wall times (per invocation) go to $OUT/wall_times.txt. Long (hours on 2 CPU
# cores): run it alone, nothing else timing beside it.
set -euo pipefail
OUT=${OUT:-runs/kl_study}
STEPS=${STEPS:-20}
N=${N:-64}
PROMPTS=${PROMPTS:-32}
BETA=${BETA:-0.01}
DIVRL=${DIVRL:-.venv/bin/divrl}
SETTINGS=(--set task=chain_sum
          --set "task_params={min_terms: 3, max_terms: 3, min_digits: 1, max_digits: 1, allow_negation: false}"
          --set eval_size="$PROMPTS" --set max_new_tokens=64 --set temperature=1.0 --set eval_temperature=1.0
          --set eval_samples=4 --set eval_every=0 --set steps="$STEPS" --set checkpoint_every=5
          --set inspect_every=10 --set monitor_kl=true --set seed=0 --set lr=1.0e-5)
mkdir -p "$OUT"

timed() {  # timed LABEL COMMAND…: run it, append its wall time
  local label=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$label: $(( $(date +%s) - start )) s" | tee -a "$OUT/wall_times.txt"
}

train() {  # train NAME OVERRIDES…: from its last checkpoint if one exists (every 5 steps)
  local name=$1 resume=false
  shift
  if [ ! -f "$OUT/$name/report.md" ]; then
    if ls "$OUT/$name"/checkpoints/step-*/trainer_state.json >/dev/null 2>&1; then
      resume=true
    else
      rm -rf "$OUT/$name"
    fi
    timed "train $name (resume=$resume)" "$DIVRL" train --recipe grpo "${SETTINGS[@]}" "$@" \
      --set output_dir="$OUT/$name" --set resume="$resume"
  fi
}

train reverse_kl --set kl_coef="$BETA" --set kl_estimator=exact
train forward_kl --set kl_coef=0 --set "terms=[{divergence: forward_kl, target: reference, coef: $BETA, estimator: exact}]"
train no_kl --set kl_coef=0

evaluate() {  # evaluate OUT_DIR EVAL_ARGS…
  local dir=$1
  shift
  if [ ! -f "$dir/eval.json" ]; then
    timed "eval $dir" "$DIVRL" eval "$@" --n "$N" --temperature 1.0 --best-of 4,16 --out "$dir"
  fi
}

evaluate "$OUT/base/eval" --model default --config "$OUT/reverse_kl/config.yaml"
for name in reverse_kl forward_kl no_kl; do
  evaluate "$OUT/$name/eval" --model "$OUT/$name"
done
"$DIVRL" compare "$OUT/base/eval" "$OUT/reverse_kl" "$OUT/forward_kl" "$OUT/no_kl" \
  --labels "base,reverse KL,forward KL,no KL" --out "$OUT/compare"
