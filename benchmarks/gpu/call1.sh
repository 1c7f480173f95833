#!/bin/bash
# Device call 1 of 2 (see prepare.sh): install what the image lacks, keep the GGUF's first part,
# run the device-marked tests (the tiny model needs only the tokenizer files).
set -u
exec > >(tee "$OUT/call1.log") 2>&1
date; nvidia-smi -L; nproc
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
mkdir -p /root/gpu && cp .gpu/a/g.xz.a /root/gpu/
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade .gpu/whl/*.whl || echo "WHEELS FAILED"
python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu/a/pycosat-*.tar.gz || echo "PYCOSAT FAILED"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "DIVRL INSTALL FAILED"
python3 -c "import reasoning_gym, trl, transformers, datasets, gguf, divrl; print('imports ok: trl', trl.__version__, 'transformers', transformers.__version__)" \
  && echo ok >/root/gpu/ready
mkdir -p /root/dcache/SmolLM2-135M-Instruct-tokenizer
python3 -c "import tarfile; tarfile.open('.gpu/a/tokenizer.tar.xz').extractall('/root/dcache/SmolLM2-135M-Instruct-tokenizer')"
echo "=== device-marked tests"; date
DIVRL_CACHE=/root/dcache HF_HUB_OFFLINE=1 timeout 200 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -m device \
  tests/test_device.py 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error" | tail -30
date
