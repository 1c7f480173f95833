#!/bin/bash
# Sourced by the device calls after install.sh: benchmarks/rollout.py on CUDA with the default
# model's architecture and random weights (a decode step's operators and times do not depend on
# the weights, and the GGUF file need not be there); extra arguments go to rollout.py (--profile).
echo "=== samplers (random weights)"; date
cp .gpu/a/config.json /root/dcache/SmolLM2-135M-Instruct-tokenizer/
timeout 100 python3 benchmarks/rollout.py --model /root/dcache/SmolLM2-135M-Instruct-tokenizer --random-init \
  --device cuda --prompts 4 --group 8 --new 64 --repeats 2 "$@" >"$OUT/rollout.txt" 2>&1
echo "rollout exit $?"; grep -E "throughput|tok/s|synchronizations" "$OUT/rollout.txt"
