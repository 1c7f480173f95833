"""RECAP's online reweighting (divrl.recap): the formula on hand-computed numbers, its checks
(weights sum to K, equal signals → equal weights, noisier → more weight), the reward-shortfall
convention, the config checks, and its series carried through a resume."""

import json
import math

import pytest

from cli_args import TINY_RUN
from divrl.config import ConfigError, build_config
from divrl.recap import Reweighting, ReweightingSpec, recap_weights
from divrl.trainer import Trainer


def test_recap_weights_on_hand_computed_numbers():
    """W = 2, T = 5, ε = 0. A = [1, 1, .5, .5]: μ̃ = 1, μ = .5, c = 2; σ = √(4·.25²/3) = .288675,
    i = .288675/1.5 = .192450, s = 2.192450. B = [.5, .5, .5, .5]: c = 1, i = 0, s = 1.
    λ_A = 2·e^{s_A/5}/(e^{s_A/5} + e^{1/5}) = 2/(1 + e^{−1.192450/5}) = 1.118683, λ_B = .881317."""
    weights = recap_weights([[1.0, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], window=2, temperature=5.0, eps=0.0)
    assert weights == pytest.approx([1.118683, 0.881317], abs=1e-6)
    assert sum(weights) == pytest.approx(2.0)
    # only the last 2W values count; a longer history changes nothing
    longer = recap_weights([[9.0, 1.0, 1.0, 0.5, 0.5], [0.1, 0.5, 0.5, 0.5, 0.5]], window=2, temperature=5.0, eps=0.0)
    assert longer == pytest.approx(weights)


def test_weights_sum_to_k_equal_signals_give_equal_weights_and_noise_gains_weight():
    series = [[0.9, 0.7, 0.6, 0.4]] * 3
    assert recap_weights(series, 2, 5.0, 0.05) == pytest.approx([1.0, 1.0, 1.0])
    # same means in both windows (c = 1); B is noisy: σ = √(4·.2²/3) = .230940, i = .230940
    calm, noisy = recap_weights([[0.5, 0.5, 0.5, 0.5], [0.3, 0.7, 0.7, 0.3]], 2, 5.0, 0.0)
    assert noisy == pytest.approx(2 / (1 + math.exp(-0.230940 / 5)), abs=1e-6) and noisy > 1 > calm
    assert calm + noisy == pytest.approx(2.0)
    # a lower temperature sharpens the same priorities
    sharp = recap_weights([[0.5, 0.5, 0.5, 0.5], [0.3, 0.7, 0.7, 0.3]], 2, 0.5, 0.0)
    assert sharp[1] > noisy


def test_all_weights_are_one_until_every_series_holds_two_windows():
    assert recap_weights([[1.0, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3]], 2, 5.0, 0.05) == [1.0, 1.0]


def test_the_loss_of_a_task_is_its_reward_shortfall_so_an_improving_task_gains_weight():
    """The convention: L_k = 1 − r̄_k. A task whose reward rises 0 → .5 has a falling loss
    (c = μ̃/μ = 2 > 1) and gains weight over a flat one; a solved task (shortfall 0 in both windows)
    is saturated, c = 1 and i = 0 (ε keeps it from 0/0), like any flat one."""
    reweighting = Reweighting(ReweightingSpec(window=2, temperature=5.0, eps=0.0), ["math", "general"])
    for step, reward in enumerate([0.0, 0.0, 0.5, 0.5]):
        weights = reweighting.observe({"math": reward, "general": 0.5})
        if step < 3:
            assert weights == {"math": 1.0, "general": 1.0}
    assert reweighting.series["math"] == [1.0, 1.0, 0.5, 0.5]
    assert weights == pytest.approx({"math": 1.118683, "general": 0.881317}, abs=1e-6)
    solved = Reweighting(ReweightingSpec(window=2), ["a", "b"])
    for _ in range(4):
        weights = solved.observe({"a": 1.0, "b": 0.3})
    assert weights == pytest.approx({"a": 1.0, "b": 1.0})
    # a member without samples this step keeps its series; the window holds the last 2W values only
    solved.observe({"b": 1.0})
    assert solved.series == {"a": [0.0] * 4, "b": pytest.approx([0.7, 0.7, 0.7, 0.0])}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mixture_reweighting={window: 10}"], "needs task: mixture with at least 2 tasks"),
        (
            ["task=mixture", "mixture=[{task: chain_sum}]", "mixture_reweighting={}"],
            "needs task: mixture with at least 2 tasks",
        ),
        (
            ["task=mixture", "mixture=[{task: chain_sum}, {task: letter_counting}]", "mixture_reweighting={window: 0}"],
            "window: must be an integer ≥ 1",
        ),
        (
            [
                "task=mixture",
                "mixture=[{task: chain_sum}, {task: letter_counting}]",
                "mixture_reweighting={temperature: 0}",
            ],
            "temperature: must be a finite number > 0",
        ),
        (
            [
                "task=mixture",
                "mixture=[{task: chain_sum}, {task: letter_counting}]",
                "mixture_reweighting={eps: .inf}",
            ],
            "eps: must be a finite number > 0, got inf",
        ),
        (
            ["task=mixture", "mixture=[{task: chain_sum}, {task: letter_counting}]", "mixture_reweighting={windw: 3}"],
            "unknown field(s) ['windw']",
        ),
        (
            [
                "task=mixture",
                "mixture=[{task: chain_sum}, {task: letter_counting}]",
                "mixture_reweighting={}",
                "policy_gradient=false",
                "kl_coef=0.1",
            ],
            "policy_gradient is false",
        ),
    ],
)
def test_bad_reweighting_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert "config key 'mixture_reweighting'" in str(err.value) and message in str(err.value)


def test_the_reweighting_series_survives_a_resume(tmp_path, say_task):
    """A mixture of chain_sum (the tiny model scores 0: shortfall 1, flat) and a JSONL task scored
    by completion-length parity (noisy), W = 1: the weights move from step 2 on. Two steps, then a
    resumed 3rd, end with the series and weights of an uninterrupted 3-step run."""
    data = say_task(range(24), "parity")[0].removeprefix("task=")
    args = [
        *TINY_RUN,
        "prompts_per_step=4",
        "checkpoint_every=1",
        "eval_every=0",
        f"mixture=[{{task: chain_sum}}, {{task: '{data}', verifier: 'parity_verifier:parity', name: say}}]",
        "mixture_reweighting={window: 1}",
    ]

    def run(out, *extra):
        cfg = build_config(None, [*args, f"output_dir={tmp_path / out}", *extra], recipe="recap")
        trainer = Trainer(cfg, log=lambda *_: None)
        trainer.run()
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        weights = [{k: v for k, v in r.items() if k.startswith("recap_weight/")} for r in rows if "reward" in r]
        assert trainer.reweighting is not None
        return trainer.reweighting.state_dict(), weights

    state_two, _ = run("a", "steps=2")
    resumed, resumed_weights = run("a", "steps=3", "resume=true")
    uninterrupted, weights = run("b", "steps=3")
    assert resumed == uninterrupted != state_two
    assert resumed_weights[-1] == weights[-1] and weights[-1]["recap_weight/say"] != 1.0
    assert sum(weights[-1].values()) == pytest.approx(2.0)
    assert weights[0] == {"recap_weight/chain_sum": 1.0, "recap_weight/say": 1.0}  # before 2W steps
