"""Numerical faults: a non-finite loss or gradient skips the step and says which part; K in a
row stop the run with its checkpoints intact; bfloat16 log-probs are never positive."""

import dataclasses
import math

import pytest
import torch

from divrl import weights
from divrl.checkpoint import checkpoint_dirs, load_checkpoint
from divrl.chunked import Head, logprob_entropy
from divrl.config import ConfigError, build_config
from divrl.models import load_model
from divrl.runlog import read_metrics
from divrl.trainer import NonFiniteError, Trainer


def tiny_cfg(tmp_path, *extra):
    """A tiny run the untrained model never solves: with `signed` advantages every completion has
    A = −1, so the policy gradient is never zero."""
    return build_config(
        None,
        [
            "model=tiny",
            "steps=2",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=2",
            "group_size=2",
            "max_new_tokens=4",
            "eval_size=2",
            "eval_samples=1",
            "train_size=20",
            "lr=1e-3",
            "checkpoint_every=1",
            "eval_every=0",
            "inspect_every=0",
            "advantage=signed",
            *extra,
        ],
    )


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[name]) for name, p in model.named_parameters())


ZERO_MASS_TARGET = (
    "terms=[{divergence: reverse_kl, estimator: k3, coef: 0.1, target: "
    "{filter: {p: reference, min_p: 0.5, relative: true}}}]"
)  # q(y) = 0 at most sampled y


def test_a_non_finite_term_skips_the_step_and_a_finite_step_then_proceeds(tmp_path, one_thread):
    """k3 = e^r − 1 − r is +inf where the target has no mass at the sampled token (r = −inf): the
    loss is +inf though its gradient is finite, and the step is skipped, naming the term."""
    trainer = Trainer(tiny_cfg(tmp_path, ZERO_MASS_TARGET), log=lambda *_: None)
    before = weights_of(trainer.model)
    metrics = trainer.train_step(0)
    assert metrics["skipped_step"] == 1
    assert metrics["skip_reason"] == "non-finite reverse_kl_to_filter_loss"
    assert math.isfinite(metrics["pg_loss"]) and math.isfinite(metrics["grad_norm"])
    assert unchanged(trainer.model, before)
    assert not trainer.optimizer.state  # AdamW took no step: no moments, no step count
    assert all(p.grad is None for p in trainer.model.parameters())

    trainer.online_spec = dataclasses.replace(trainer.online_spec, terms=())  # the fault is gone
    metrics = trainer.train_step(1)
    assert metrics["skipped_step"] == 0 and "skip_reason" not in metrics
    assert not unchanged(trainer.model, before) and trainer.optimizer.state
    assert trainer.skipped_steps == []


def test_a_non_finite_token_weight_is_named(tmp_path, monkeypatch, one_thread):
    """The policy gradient's weight `asymmetric`, made +inf on every token, is named first."""
    registered = weights._WEIGHTS["asymmetric"]
    monkeypatch.setitem(
        weights._WEIGHTS,
        "asymmetric",
        dataclasses.replace(registered, fn=lambda stats, **params: registered.fn(stats, **params) * math.inf),
    )
    trainer = Trainer(tiny_cfg(tmp_path, "pg_weight=asymmetric"), log=lambda *_: None)
    before = weights_of(trainer.model)
    metrics = trainer.train_step(0)
    assert metrics["skip_reason"] == "non-finite pg weight asymmetric, pg_loss"
    assert unchanged(trainer.model, before)


def test_a_nan_reference_skips_the_step_naming_the_term(tmp_path, one_thread):
    """NaN weights in the reference make its log-probs NaN: the objective raises NaNObjectiveError
    (`divrl.objectives`), which the trainer turns into a skipped step naming the NaN term."""
    trainer = Trainer(tiny_cfg(tmp_path, "kl_coef=0.1"), log=lambda *_: None)
    with torch.no_grad():
        trainer.reference.model.norm.weight.fill_(math.nan)
    before = weights_of(trainer.model)
    metrics = trainer.train_step(0)
    assert metrics["skipped_step"] == 1 and "NaN in" in metrics["skip_reason"]
    assert "reverse_kl_to_reference" in metrics["skip_reason"]
    assert math.isnan(metrics["grad_norm"])  # no gradient norm: the pass stopped at the error
    assert unchanged(trainer.model, before) and not trainer.optimizer.state
    assert all(p.grad is None for p in trainer.model.parameters())


def test_consecutive_skips_stop_the_run_and_keep_the_last_checkpoint(tmp_path, one_thread):
    """From the second step on, a gradient hook makes one gradient NaN (the loss stays finite):
    with max_skipped_steps 2 the third step raises, naming both skipped steps and the checkpoint."""
    logged = []
    trainer = Trainer(tiny_cfg(tmp_path, "steps=5", "max_skipped_steps=2"), log=logged.append)
    train_step = trainer.train_step

    def faulty_from_step_2(step):
        if step == 1:
            trainer.model.model.norm.weight.register_hook(lambda grad: grad * math.nan)
        return train_step(step)

    trainer.train_step = faulty_from_step_2
    with pytest.raises(NonFiniteError) as raised:
        trainer.run()
    run = tmp_path / "run"
    message = str(raised.value)
    assert "2 consecutive steps" in message and "step 2: non-finite gradient" in message
    assert "step 3: non-finite gradient" in message and "loss parts finite: pg_loss" in message
    assert str(run / "checkpoints" / "step-2") in message
    assert [step for step, _ in checkpoint_dirs(run)] == [1, 2]  # none after the stopping step
    assert sum("optimizer step skipped" in line for line in logged) == 2

    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward" in r]
    assert [(r["step"], r["skipped_step"]) for r in rows] == [(1, 0), (2, 1)]
    assert rows[1]["skip_reason"].startswith("non-finite gradient (norm nan")

    good = weights_of(trainer.model)  # unchanged since step 1
    for _, path in checkpoint_dirs(run):
        model, _ = load_model("tiny", seed=1)
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.Generator())
        assert unchanged(model, good)


def test_max_skipped_steps_must_be_positive():
    with pytest.raises(ConfigError, match="'max_skipped_steps' must be ≥ 1"):
        build_config(None, ["model=tiny", "max_skipped_steps=0"])


def test_bfloat16_logprobs_are_never_positive():
    """Logits of magnitude 10–35 in bfloat16 (a step of 0.125 above 16): the sampled logit computed
    apart from the tiles would give log p up to about +0.1; read from the tiles it never exceeds 0."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1024, 576, generator=generator).bfloat16()
    weight = (0.3 * torch.randn(3000, 576, generator=generator)).bfloat16()
    logits = hidden.float() @ weight.float().T
    assert 10 < float(logits.abs().amax(-1).median()) and float(logits.abs().max()) < 40
    argmax, sampled = logits.argmax(-1), torch.randint(0, 3000, (1024,), generator=generator)
    tokens = torch.where(torch.arange(1024) % 2 == 0, argmax, sampled)  # the largest log p, and any
    logp, _ = logprob_entropy(hidden, weight, tokens, chunk_vocab=512)  # a narrower last tile
    assert float(logp.max()) <= 0.0
    apart = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp((hidden @ weight.T).float(), -1)
    assert float(apart.max()) > 0.01  # the inconsistency the tiles avoid is real at this scale


def test_float32_logprobs_and_gradients_match_full_logits():
    """Value from the tiles, gradient from the product: both as full-logits log_softmax, with a
    bias and a vocabulary that ends in a narrower tile."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 24, generator=generator, requires_grad=True)
    weight = (3 * torch.randn(1000, 24, generator=generator)).requires_grad_()
    bias = torch.randn(1000, generator=generator, requires_grad=True)
    tokens = torch.cat([torch.tensor([0, 999, 383, 384]), torch.randint(0, 1000, (36,), generator=generator)])
    head = Head(weight, bias, temperature=0.7)
    logp, _ = logprob_entropy(hidden, head, tokens, chunk_tokens=16, chunk_vocab=384)
    expected = head.logits(hidden).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(40, generator=generator)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)
