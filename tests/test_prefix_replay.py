"""PrefixRL: the prefix-length rule and the trace buffer on hand-computed cases; in the trainer the
prefix is part of the prompt the update sees (no loss on it), the verifier scores prefix +
continuation, unprefixed passes fill the buffer, and the buffer survives a resume."""

import pytest

from divrl.config import ConfigError, build_config
from divrl.prefix_replay import PrefixSpec, TraceBuffer, choose_prefixes, prefix_length
from divrl.tasks import encode_prompt
from divrl.trainer import Trainer

STARTS_HELLO = "def starts_hello(completion, answer):\n    return float(completion.startswith('Hello there'))\n"


@pytest.mark.parametrize(
    "length, fraction, h",
    [(10, 0.25, 2), (10, 0.8, 8), (10, 0.05, 1), (10, 0.99, 9), (4, 0.5, 2), (3, 0.2, 1), (1, 0.5, 0)],
)
def test_prefix_length_is_the_floor_of_the_fraction_clamped_to_leave_a_token_each_side(length, fraction, h):
    # ⌊0.25·10⌋ = 2, ⌊0.05·10⌋ = 0 → 1 (at least one off-policy token), ⌊0.99·10⌋ = 9 = |y| − 1,
    # ⌊0.2·3⌋ = 0 → 1; a 1-token trace cannot be split
    assert prefix_length(length, fraction) == h


def test_the_buffer_keeps_the_newest_distinct_traces_per_prompt():
    buffer = TraceBuffer(per_prompt=2)
    for trace in ([1, 2], [3], [1, 2], [4, 5, 6]):  # [1, 2] again moves to the newest end
        buffer.add("p", trace)
    buffer.add("q", [7])
    assert buffer.traces == {"p": [[1, 2], [4, 5, 6]], "q": [[7]]}
    assert len(buffer) == 3
    again = TraceBuffer(2)
    again.load_state_dict(buffer.state_dict())
    assert again.traces == buffer.traces


def test_choose_prefixes_cuts_the_drawn_fraction_of_a_trace_with_the_given_probability():
    buffer = TraceBuffer(4)
    buffer.add("p", list(range(10)))
    half = PrefixSpec(probability=1.0, min_fraction=0.5, max_fraction=0.5)
    assert choose_prefixes(half, buffer, ["p", "unseen", "p"], "k") == [[0, 1, 2, 3, 4], [], [0, 1, 2, 3, 4]]
    assert choose_prefixes(PrefixSpec(probability=0.0), buffer, ["p"], "k") == [[]]
    many = choose_prefixes(PrefixSpec(probability=0.5), buffer, ["p"] * 4000, "k")
    assert choose_prefixes(PrefixSpec(probability=0.5), buffer, ["p"] * 4000, "k") == many  # seeded by the key
    lengths = [len(p) for p in many if p]
    assert abs(len(lengths) / 4000 - 0.5) < 0.03  # ~Binomial(4000, 0.5): 4 standard deviations
    assert set(lengths) == {2, 3, 4, 5, 6, 7}  # ⌊f·10⌋ for f ∈ [0.2, 0.8)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"probabilty": 0.5}, "unknown field"),
        ({"probability": 1.5}, "probability must be a number in \\[0, 1\\]"),
        ({"min_fraction": 0.6, "max_fraction": 0.4}, "max_fraction must be a number in \\[min_fraction"),
        ({"per_prompt": 0}, "per_prompt must be an integer ≥ 1"),
    ],
)
def test_a_bad_prefix_replay_is_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=f"'prefix_replay': .*{message}"):
        build_config(None, [f"prefix_replay={value}"])


def _trainer(tmp_path, say_task, verifier, *overrides, source=None):
    args = [
        "model=tiny",
        "steps=1",
        "prompts_per_step=3",
        "group_size=2",
        "max_new_tokens=3",
        "eval_size=2",
        "eval_samples=1",
        *say_task(range(12), verifier, source),
        f"output_dir={tmp_path / 'run'}",
        *overrides,
    ]
    return Trainer(build_config(None, args, recipe="prefix-rl"), log=lambda *_: None)


def test_the_update_sees_the_prefix_as_prompt_and_the_verifier_scores_prefix_plus_continuation(
    tmp_path, say_task, monkeypatch
):
    trainer = _trainer(
        tmp_path,
        say_task,
        "starts_hello",
        "prefix_replay={probability: 1.0, min_fraction: 0.5, max_fraction: 0.5, seed_prompts: 0}",
        source=STARTS_HELLO,
    )
    trace = trainer.tokenizer("Hello there my friend", add_special_tokens=False)["input_ids"]
    assert len(trace) == 4  # so the prefix (⌊0.5·4⌋ = 2 tokens) is "Hello there"
    for example in trainer.task.train:
        trainer.prefix_buffer.add(example.prompt, trace)
    seen = {}
    update = trainer._update
    monkeypatch.setattr(
        trainer,
        "_update",
        lambda prompts, completions, rewards, logprobs, *a, **k: (
            seen.update(prompts=prompts, completions=completions, rewards=rewards, logprobs=logprobs)
            or update(prompts, completions, rewards, logprobs, *a, **k)
        ),
    )
    texts = []
    score = trainer._score
    monkeypatch.setattr(
        trainer, "_score", lambda ex, completions, g: texts.extend(completions) or score(ex, completions, g)
    )
    offered = trainer.prompts.batch(0, 3)
    row = trainer.train_step(0)
    for prompt, example in zip(seen["prompts"], offered):  # the prefix ends the prompt: no loss on it
        assert prompt == encode_prompt(trainer.tokenizer, example.prompt, None) + trace[:2]
    # the update's completions are the policy's continuations, each with its own behaviour log-probs
    assert all(1 <= len(c) <= 3 and len(c) == len(lp) for c, lp in zip(seen["completions"], seen["logprobs"]))
    assert [t[:2] for t in texts] == [trace[:2]] * 6 and [t[2:] for t in texts] == seen["completions"]
    assert seen["rewards"] == [1.0] * 6  # "Hello there…" passes: the verifier read prefix + continuation
    assert (row["prefixed_groups"], row["prefix_length"], row["pass_rate_prefixed"]) == (1.0, 2.0, 1.0)
    assert row["prefix_fraction"] == pytest.approx(sum(2 / (2 + len(c)) for c in seen["completions"]) / 6)
    assert row["prefix_buffer_traces"] == len(trainer.task.train)  # prefixed passes do not join it


def test_unprefixed_passes_fill_the_buffer_which_a_resumed_run_reads_back(tmp_path, say_task):
    trainer = _trainer(tmp_path, say_task, "always", "prefix_replay={seed_prompts: 2}", "stored_samples=2")
    seeded = {e.prompt for e in trainer.task.train[:2]}
    assert set(trainer.prefix_buffer.traces) == seeded  # rejection sampling: every answer passes
    trainer.run()
    traces = trainer.prefix_buffer.state_dict()
    assert len(traces) > 2 and seeded <= set(traces)
    assert all(1 <= len(ts) <= 4 for ts in traces.values())
    resumed = _trainer(tmp_path, say_task, "always", "prefix_replay={seed_prompts: 2}", "resume=true", "steps=2")
    assert resumed.prefix_buffer.traces == {}  # not re-seeded: the checkpoint holds the buffer
    resumed._resume()
    assert resumed.prefix_buffer.traces == traces
