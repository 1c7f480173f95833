#!/bin/bash
# One device call without the model's file (see prepare.sh): the device-marked tests, the samplers
# timed and profiled (rollout.sh), then the whole suite but the default model's tests
# (tests/test_default_model.py needs the GGUF file), each test's outcome logged as it ends so a
# suite stopped at its limit still names its failures. ≈ 6 min of device time (2026-11-27, H200).
set -u
exec > >(tee "$OUT/suite-call.log") 2>&1
date; nvidia-smi -L; nproc
source benchmarks/gpu/install.sh
source benchmarks/gpu/device-tests.sh
source benchmarks/gpu/rollout.sh --profile
echo "=== whole suite"; date
# one thread a worker: 15 workers on 16 cores, where each would otherwise start a pool of 16
OMP_NUM_THREADS=1 timeout 200 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 15 --timeout 100 \
  --ignore tests/test_default_model.py tests >"$OUT/suite.log" 2>&1
echo "suite exit $?"; grep -E "(FAILED|ERROR) tests/" "$OUT/suite.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort | uniq
grep -cE "PASSED tests/" "$OUT/suite.log"; tail -3 "$OUT/suite.log"; date
