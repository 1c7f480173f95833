#!/bin/bash
# Device call 1 of 2 (see prepare.sh): install what the image lacks, keep the GGUF's first part,
# run the device-marked tests (the tiny model needs only the tokenizer files), time the samplers
# with the default model's architecture and random weights.
set -u
exec > >(tee "$OUT/call1.log") 2>&1
date; nvidia-smi -L; nproc
mkdir -p /root/gpu && cp .gpu/a/g.xz.a /root/gpu/
source benchmarks/gpu/install.sh
source benchmarks/gpu/device-tests.sh
source benchmarks/gpu/rollout.sh
date
