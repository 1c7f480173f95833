#!/bin/bash
# Sourced by the device calls: install what the image lacks from the carried wheels (see
# prepare.sh) and unpack the default model's tokenizer files (the tiny test model uses them).
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade .gpu/whl/*.whl || echo "WHEELS FAILED"
python3 -m pip install -q --no-index --no-deps --no-build-isolation .gpu/a/pycosat-*.tar.gz || echo "PYCOSAT FAILED"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "DIVRL INSTALL FAILED"
python3 -c "import reasoning_gym, trl, transformers, datasets, gguf, divrl; print('imports ok: trl', trl.__version__, 'transformers', transformers.__version__)" \
  && mkdir -p /root/gpu && echo ok >/root/gpu/ready
mkdir -p /root/dcache/SmolLM2-135M-Instruct-tokenizer
python3 -c "import tarfile; tarfile.open('.gpu/a/tokenizer.tar.xz').extractall('/root/dcache/SmolLM2-135M-Instruct-tokenizer')"
export DIVRL_CACHE=/root/dcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
