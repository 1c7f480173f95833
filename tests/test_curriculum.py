"""FG-ExPO's Gaussian curriculum as a pluggable prompt sampler: weights, EMA updates, seeded draws,
validation, and its state carried through checkpoints."""

import math

import pytest
import torch

from cli_args import TINY_RUN
from divrl.config import ConfigError, build_config
from divrl.prompts import GaussianCurriculum, build_source
from divrl.tasks import Example
from divrl.trainer import Trainer


def _examples(n=20):
    return [Example(f"p{i}", str(i), {}) for i in range(n)]


def test_weights_start_uniform_and_follow_the_ema_of_pass_rates():
    examples = _examples()
    source = build_source({"gaussian_curriculum": {"alpha": 0.9, "sigma": 0.35}}, examples, seed=1)
    assert isinstance(source, GaussianCurriculum)
    torch.testing.assert_close(source.weights(), torch.ones(20, dtype=torch.float64))
    source.observe([examples[0], examples[1], examples[2]], [1.0, 0.0, 0.5])
    torch.testing.assert_close(source.ema[:4], torch.tensor([0.55, 0.45, 0.5, 0.5], dtype=torch.float64))
    w = source.weights()
    assert w[0].item() == pytest.approx(math.exp(-(0.05**2) / (2 * 0.35**2)))
    assert w[1].item() == pytest.approx(w[0].item()) and w[2] == 1.0
    for _ in range(40):  # a prompt always solved drifts to p̃ → 1, weight exp(−0.25/(2σ²))
        source.observe([examples[0]], [1.0])
    assert source.weights()[0].item() == pytest.approx(math.exp(-0.25 / (2 * 0.35**2)), rel=0.05)


def test_a_narrow_curriculum_still_draws_when_every_plain_weight_underflows():
    """σ = 0.01 puts a prompt at p̃ = 0.9 at exp(−800) = 0 in float64; scaled so the largest weight
    is 1 (log space), the proportions stay exp(−(p̃ − 0.5)²/(2σ²)) and the draw goes on."""
    examples = _examples(3)
    source = build_source({"gaussian_curriculum": {"alpha": 0.0, "sigma": 0.01}}, examples, seed=1)
    source.observe(examples, [0.9, 1.0, 0.0])
    assert torch.exp(-((source.ema - 0.5) ** 2) / (2 * 0.01**2)).sum() == 0  # the plain weights
    w = source.weights()
    torch.testing.assert_close(
        w, torch.tensor([1.0, math.exp(-0.09 / 2e-4), math.exp(-0.09 / 2e-4)], dtype=torch.float64)
    )
    assert source.batch(0, 1) == [examples[0]] and len(source.batch(1, 3)) == 3


def test_a_share_of_zero_prompts_draws_none():
    """A mixture task whose share of a step rounds to 0 asks its curriculum for 0 prompts."""
    source = build_source({"gaussian_curriculum": {}}, _examples(), seed=1)
    assert source.batch(0, 0) == [] and source.refill(0, 1, 0) == []


def test_draws_are_seeded_distinct_and_restored_with_the_state():
    examples = _examples()
    source = build_source({"gaussian_curriculum": {}}, examples, seed=1)
    for _ in range(30):  # the first half is always solved (p̃ → 0.96): drawn less often
        source.observe(examples[:10], [1.0] * 10)
    batch = source.batch(3, 8)
    assert len({e.prompt for e in batch}) == 8 and batch == source.batch(3, 8)
    again = build_source({"gaussian_curriculum": {}}, examples, seed=1)
    again.load_state_dict(source.state_dict())
    assert again.batch(3, 8) == batch and again.refill(3, 1, 4) == source.refill(3, 1, 4)
    hard = sum(int(e.answer) >= 10 for step in range(50) for e in source.batch(step, 4))
    assert hard > 0.6 * 200  # the frontier (p̃ = 0.5) prompts dominate


@pytest.mark.parametrize(
    "value, message",
    [
        ({"gaussian_curriculum": {"sigma": 0}}, "sigma: must be a finite number > 0"),
        ({"gaussian_curriculum": {"alpha": 1.5}}, "alpha: must lie in [0, 1)"),
        ({"gaussian_curriculum": {"sigmaa": 1}}, "unexpected keyword argument 'sigmaa'"),
        ("curriculum", "unknown prompt sampler 'curriculum'"),
    ],
)
def test_bad_sampler_settings_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError) as err:
        build_config(
            None,
            [f"prompt_sampler={value!r}".replace("'", "") if isinstance(value, str) else f"prompt_sampler={value}"],
        )
    assert "config key 'prompt_sampler'" in str(err.value) and message in str(err.value)


def test_the_curriculum_state_survives_a_resume(tmp_path):
    """2 steps, then a resumed 3rd, end with the EMA of an uninterrupted 3-step run (it would not
    if the state were lost: steps 1–2 moved it)."""
    args = [
        *TINY_RUN,
        "prompts_per_step=2",
        "checkpoint_every=1",
        "eval_every=0",
    ]

    def run(out, *extra):
        trainer = Trainer(
            build_config(None, [*args, f"output_dir={tmp_path / out}", *extra], recipe="fg-expo"), log=lambda *_: None
        )
        trainer.run()
        return trainer.prompts.state_dict()["ema"]

    after_two = run("a", "steps=2")
    assert after_two != [0.5] * len(after_two)
    resumed = run("a", "steps=3", "resume=true")
    assert resumed == run("b", "steps=3") != after_two
