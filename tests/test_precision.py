"""`dtype: auto`: the faster precision measured on this machine, cached per machine and model."""

import json

import pytest
import torch

from divrl import precision
from divrl.models import tiny_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVRL_CACHE", str(tmp_path))
    return tmp_path / "precision.json"


def test_named_dtypes_need_no_measurement(tiny, monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda model: pytest.fail("measured"))
    assert precision.resolve("float32", tiny[0]) == "fp32"
    assert precision.resolve("bfloat16", tiny[0]) == "bf16"


def test_bf16_only_when_measured_at_least_ten_percent_faster():
    assert precision.faster({"fp32": 1.0, "bf16": 0.5}) == "bf16"
    assert precision.faster({"fp32": 1.0, "bf16": 0.9}) == "bf16"
    assert precision.faster({"fp32": 1.0, "bf16": 0.95}) == "fp32"
    assert precision.faster({"fp32": 1.0, "bf16": 146.0}) == "fp32"


def test_auto_measures_once_per_machine_and_model_and_logs_why(tiny, cache, monkeypatch):
    calls = []

    def fake(model):
        calls.append(model)
        return {"fp32": 2.0, "bf16": 1.0}

    monkeypatch.setattr(precision, "measure", fake)
    said = []
    assert precision.resolve("auto", tiny[0], said.append) == "bf16"
    assert precision.resolve("auto", tiny[0]) == "bf16" and len(calls) == 1  # read back, not re-measured
    assert "bf16" in said[0] and "2 s at fp32" in said[0] and str(cache) in said[0]
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)  # the same architecture, other weights: the same entry
    other = LlamaForCausalLM(tiny_config(tiny[0].config.vocab_size))
    assert precision.resolve("auto", other) == "bf16" and len(calls) == 1
    config = tiny_config(tiny[0].config.vocab_size)
    config.num_hidden_layers = 3
    assert precision.resolve("auto", LlamaForCausalLM(config)) == "bf16" and len(calls) == 2  # another model
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all(k.startswith(precision.machine_key(tiny[0].device)) for k in entries)


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        "null",
        '{"KEY": "bf16"}',
        '{"KEY": {"precision": "bf16"}}',
        '{"KEY": {"precision": "fp16", "seconds": {}}}',
    ],
)
def test_a_cache_this_module_did_not_write_is_measured_again(tiny, cache, monkeypatch, content):
    """Valid JSON of another shape (a list, null, an entry without timings or with another
    precision) is neither trusted nor a crash: measured again and the entry rewritten."""
    key = f"{precision.machine_key(tiny[0].device)} | {precision.model_key(tiny[0])}"
    cache.write_text(content.replace("KEY", key.replace('"', '\\"')))
    monkeypatch.setattr(precision, "measure", lambda model: {"fp32": 1.0, "bf16": 2.0})
    assert precision.resolve("auto", tiny[0]) == "fp32"
    assert json.loads(cache.read_text())[key] == {"precision": "fp32", "seconds": {"fp32": 1.0, "bf16": 2.0}}


def test_measure_times_both_precisions_of_the_real_forward(tiny, cache):
    seconds = precision.measure(tiny[0])
    assert set(seconds) == {"fp32", "bf16"} and all(v > 0 for v in seconds.values())
    assert precision.resolve("auto", tiny[0]) in ("fp32", "bf16")
    assert cache.is_file()


def test_a_burst_of_other_work_during_one_round_does_not_decide(tiny, monkeypatch):
    """Rounds alternate float32 and bf16 and each keeps its best: a float32 run slowed 10× by
    another job (the measured failure: 0.34 s against an idle 0.03) does not make bf16 look faster."""
    calls = []
    times = {"fp32": [0.03, 0.34, 0.03, 0.03, 0.03], "bf16": [0.06, 0.05, 0.05, 0.05]}  # warm-ups first

    def fake(model, ids, which):
        calls.append(which)
        return times[which].pop(0)

    monkeypatch.setattr(precision, "_forward_seconds", fake)
    seconds = precision.measure(tiny[0])
    assert calls == ["fp32", "fp32", "bf16", *["fp32", "bf16"] * precision.ROUNDS]
    assert seconds == {"fp32": 0.03, "bf16": 0.05} and precision.faster(seconds) == "fp32"


def test_attention_at_float32_precision_is_float32_and_named_settings_need_no_measurement(tiny, monkeypatch):
    monkeypatch.setattr(precision, "measure_attention", lambda model: pytest.fail("measured"))
    assert precision.resolve_attention("auto", "fp32", tiny[0]) == "float32"
    assert precision.resolve_attention("bfloat16", "bf16", tiny[0]) == "bfloat16"
    assert precision.resolve_attention("float32", "bf16", tiny[0]) == "float32"


@pytest.mark.parametrize(
    ("seconds", "choice"),
    [({"float32": 1.0, "bfloat16": 2.0}, "float32"), ({"float32": 0.95, "bfloat16": 1.0}, "bfloat16")],
)
def test_auto_attention_is_float32_only_when_measured_at_least_ten_percent_faster_and_cached(
    tiny, cache, monkeypatch, seconds, choice
):
    calls = []
    monkeypatch.setattr(precision, "measure_attention", lambda model: calls.append(model) or dict(seconds))
    said = []
    assert precision.resolve_attention("auto", "bf16", tiny[0], said.append) == choice
    assert precision.resolve_attention("auto", "bf16", tiny[0]) == choice and len(calls) == 1  # read back
    assert choice in said[0] and str(cache) in said[0]
    (key,) = [k for k in json.loads(cache.read_text()) if "attention" in k]
    assert key.startswith(precision.machine_key(tiny[0].device)) and str(precision._attention_shape(tiny[0])) in key


def test_a_broken_attention_entry_is_measured_again(tiny, cache, monkeypatch):
    key = f"{precision.machine_key(tiny[0].device)} | attention {precision._attention_shape(tiny[0])}"
    cache.write_text(json.dumps({key: {"attention_dtype": "float16", "seconds": {}}}))
    monkeypatch.setattr(precision, "measure_attention", lambda model: {"float32": 1.0, "bfloat16": 3.0})
    assert precision.resolve_attention("auto", "bf16", tiny[0]) == "float32"
    assert json.loads(cache.read_text())[key]["attention_dtype"] == "float32"


def test_measure_attention_times_both_dtypes_of_a_real_forward_and_backward(tiny):
    seconds = precision.measure_attention(tiny[0])
    assert set(seconds) == {"float32", "bfloat16"} and all(0 < v < 10 for v in seconds.values())
