"""DSDR: the global diversity score (hand numbers), its allocation to the local entropy term, the
objective's local term on a hand toy, and the bonus in a training step."""

import dataclasses
import math

import pytest
import torch

import test_recipes as toy
from divrl import diversity, objectives, weights
from divrl.config import build_config
from divrl.trainer import Trainer


def test_formulas_are_latex_spans_and_plain_operator_runs_with_a_digit():
    text = "So 3 + 4 = 7, a well-known fact; also $x^2 + 1$ and 12 * (3 - 1) = 24."
    assert diversity.formula_set(text) == {"3+4=7", "x^2+1", "12*(3-1)=24"}
    assert diversity.formula_set("no maths here, only words-with-hyphens") == frozenset()


def test_scores_on_hand_numbers():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # cos: 0 between 0 and 1, 1 between 0 and 2
    # D_emb: 0 → (½·1 + 0)/2 = ¼; 1 → (½ + ½)/2 = ½; 2 → ¼
    torch.testing.assert_close(diversity.embedding_distance(z), torch.tensor([0.25, 0.5, 0.25]))
    sets = [frozenset({"1+1=2", "2+2=4"}), frozenset({"1+1=2"}), frozenset()]
    torch.testing.assert_close(
        diversity.unique_formula_fraction(sets), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    )
    texts = ["1 + 1 = 2 and 2 + 2 = 4", "1 + 1 = 2", "nothing"]
    torch.testing.assert_close(
        diversity.diversity_scores(texts, z), torch.tensor([0.375, 0.25, 0.125], dtype=torch.float64)
    )


def _allocation(d, passed, groups, tau=5.0):
    stats = weights.TokenStats(
        rows=torch.arange(len(d)),
        advantages=torch.zeros(len(d), dtype=torch.float64),
        rewards=torch.zeros(len(d)),
        group_pass_rate=torch.zeros(len(d)),
        passed=torch.tensor(passed),
        groups=torch.tensor(groups),
        diversity=torch.tensor(d, dtype=torch.float64),
    )
    return weights.compute([("diversity_allocation", {"tau": tau})], stats)


def test_allocation_is_a_softmax_over_the_passing_completions_times_the_group_size():
    got = _allocation([0.2, 0.4, 0.9, 0.1, 0.3, 0.5], [True, True, False, False, False, False], [0, 0, 0, 1, 1, 1])
    e = [math.exp(5 * 0.2), math.exp(5 * 0.4)]
    expected = [3 * e[0] / sum(e), 3 * e[1] / sum(e), 0, 0, 0, 0]  # group 1 has no pass: no local term
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    uniform = _allocation([0.2, 0.4, 0.9], [True, True, False], [0, 0, 0], tau=0.0)
    torch.testing.assert_close(uniform, torch.tensor([1.5, 1.5, 0.0], dtype=torch.float64))


def test_duplicating_a_correct_completion_lowers_its_weight():
    encoder_free = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    before = diversity.embedding_distance(encoder_free)
    after = diversity.embedding_distance(torch.cat([encoder_free, encoder_free[:1]]))
    assert after[0] < before[0]
    w_before = _allocation(before.tolist(), [True, True, True], [0, 0, 0]) / 3
    w_after = _allocation(after.tolist(), [True, True, True, True], [0, 0, 0, 0]) / 4
    assert w_after[0] < w_before[0]


def test_the_local_term_is_the_allocated_mean_token_entropy_of_passing_completions():
    spec = toy._spec("dsdr")
    rewards = [1.0, 1.0, 0.0, 1.0]  # group 1: both pass; group 2: one pass
    inputs, _ = toy._toy(spec, rewards)
    d = torch.tensor([0.3, 0.1, 0.8, 0.5], dtype=torch.float64)
    inputs = dataclasses.replace(inputs, diversity=d, groups=torch.arange(4) // 2)
    out = objectives.objective_loss(spec, inputs)
    logp = inputs.policy.head.logits(inputs.policy.hidden).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    w01 = torch.softmax(5 * d[:2], 0)
    w = torch.stack([w01[0], w01[1], torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)])
    lengths = torch.tensor(toy.LENGTHS, dtype=torch.float64)
    per_completion = torch.zeros(4, dtype=torch.float64).index_add(0, toy.ROWS, math.log(toy.V) - entropy)
    expected = 0.001 * (w * per_completion / lengths).sum() / 2  # mean over the 2 prompts
    assert out.loss_parts["reverse_kl_to_uniform"] == pytest.approx(expected.item(), rel=1e-5)


def test_the_bonus_separates_equal_rewards_by_diversity_in_a_step(tmp_path, say_task):
    cfg = build_config(
        None,
        [
            "model=tiny",
            *say_task(range(20), "always"),
            "prompts_per_step=2",
            "group_size=3",
            "max_new_tokens=6",
            "eval_size=2",
            "eval_samples=1",
            "diversity_bonus={coef: 0.5}",
            f"output_dir={tmp_path / 'run'}",
        ],
        recipe="dsdr",
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    row = trainer.train_step(0)
    assert row["pass_rate"] == 1.0 and 0 < row["diversity"] <= 1 and row["diversity_of_passes"] == row["diversity"]
    assert row["pg_loss"] != 0.0  # all rewards are 1, yet the diversity bonus gives advantages
    assert row["reverse_kl_to_uniform_mean_weight"] == pytest.approx(1.0)  # every completion passes


def test_diversity_keys_are_validated():
    with pytest.raises(Exception, match="'diversity_bonus': unknown key 'lambda'"):
        build_config(None, ["diversity_bonus={lambda: 1}"])
    with pytest.raises(Exception, match="'diversity_bonus': clip must be a number > 0"):
        build_config(None, ["diversity_bonus={clip: 0}"])
    with pytest.raises(Exception, match="'diversity_bonus' must be set for the weight diversity_allocation"):
        build_config(None, ["diversity_bonus=null"], recipe="dsdr")
    with pytest.raises(Exception, match="neither 'minilm' nor a model directory"):
        build_config(None, ["diversity_bonus={encoder: /nowhere}"])
