"""Preference pairs and the DPO / IPO / INPO losses (`divrl.preferences`), the HyPO and INPO
claims in the exact tabular lab, and preference runs of the trainer (recipes dpo, ipo, hypo, inpo)."""

import json
import math
import shutil

import pytest
import torch

from divrl import divergences, lab, preferences
from divrl.cli import main
from divrl.config import ConfigError, build_config
from divrl.preferences import PreferenceError, PreferenceSpec, pair_loss

# ----- the losses on hand-computed numbers ---------------------------------------------------
POLICY = torch.tensor([[-1.0, -3.0]], dtype=torch.float64)  # Σ log πθ of chosen, rejected
REFERENCE = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_margin_gain():
    # margins: policy −1 − (−3) = 2, reference 0 → −log σ(0.5·2) = log(1 + e^{−1})
    loss = pair_loss(PreferenceSpec(loss="dpo", beta=0.5), POLICY, REFERENCE)
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1))], dtype=torch.float64))


def test_ipo_regresses_the_length_averaged_log_ratio_margin_onto_one_over_two_tau():
    # log-ratios: chosen +1 over 2 tokens = 0.5, rejected −1 over 4 tokens = −0.25 → h = 0.75;
    # τ = 0.1 → (0.75 − 5)² = 18.0625
    lengths = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    loss = pair_loss(PreferenceSpec(loss="ipo", beta=0.1), POLICY, REFERENCE, lengths=lengths)
    torch.testing.assert_close(loss, torch.tensor([18.0625], dtype=torch.float64))


def test_inpo_loss_on_hand_computed_numbers():
    # η = 0.5, τ = 0.25: h = 2 − ½·0 − ½·(−1.5 − (−2.5)) = 1.5; (1.5 − 1/(2η))² = 0.25
    anchor = torch.tensor([[-1.5, -2.5]], dtype=torch.float64)
    loss = pair_loss(PreferenceSpec(loss="inpo", eta=0.5, tau=0.25, round_steps=1), POLICY, REFERENCE, anchor)
    torch.testing.assert_close(loss, torch.tensor([0.25], dtype=torch.float64))


def test_pairs_from_samples_take_the_first_best_passing_and_the_first_worst_failing():
    completions = [[[1], [2], [3]], [[4], [5]], [[6], [7]], [[8], [9], [10]]]
    rewards = [[0.0, 1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.5, 1.0, 0.0]]
    pairs = preferences.pairs_from_samples(["a", "b", "c", "d"], completions, rewards, threshold=1.0)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a", [2], [1]), ("d", [9], [10])]


# ----- data ------------------------------------------------------------------------------------
def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_takes_strings_and_the_hugging_face_conversational_convention(tmp_path):
    user = [{"role": "user", "content": "Say 1"}]
    rows = [
        {"prompt": "Say 2", "chosen": "2", "rejected": "3"},
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "1"}],
            "rejected": [{"role": "assistant", "content": "0"}],
        },
        {
            "chosen": [*user, {"role": "assistant", "content": "1"}],
            "rejected": [*user, {"role": "assistant", "content": "7"}],
        },
    ]
    pairs = preferences.read(_write(tmp_path, rows))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Say 2", "2", "3"),
        ("Say 1", "1", "0"),
        ("Say 1", "1", "7"),
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "x", "chosen": "a"}', "needs 'chosen' and 'rejected'"),
        ('{"prompt": "x", "chosen": "", "rejected": "b"}', "'chosen' must be a non-empty string"),
        (
            '{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "a", "rejected": "b"}',
            "multi-turn",
        ),
        (
            '{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "c"}',
            "same messages",
        ),
        ("not json", "pairs.jsonl:2"),
        ('{"prompt": ["hi"], "chosen": "a", "rejected": "b"}', "must be one user message"),
        ('{"prompt": [3], "chosen": "a", "rejected": "b"}', "must be one user message"),
        ('{"chosen": ["x", "y"], "rejected": ["x", "z"]}', r"'chosen' must be a string or a list of \{role, content\}"),
    ],
)
def test_a_bad_line_is_refused_with_its_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, ['{"prompt": "ok", "chosen": "a", "rejected": "b"}', row])
    with pytest.raises(PreferenceError, match=message) as err:
        preferences.read(path)
    assert "pairs.jsonl:2" in str(err.value)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"loss": "kto"}, "loss must be one of"),
        ({"los": "dpo"}, r"unknown field\(s\) \['los'\]"),
        ({"beta": 0}, "beta must be a finite number > 0"),
        ({"loss": "inpo"}, "needs round_steps"),
        ({"loss": "inpo", "round_steps": 2, "eta": 0.1, "tau": 0.1}, "0 ≤ tau < eta"),
        ({"data": "x.jsonl", "round_steps": 2}, "exclude each other"),
        ({"data": "missing.jsonl"}, "does not exist"),
        ({"pairs_per_step": 0}, "pairs_per_step must be an integer ≥ 1"),
    ],
)
def test_bad_preference_values_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_config(None, [f"preference={json.dumps(value)}"], recipe="dpo")
    assert "config key 'preference'" in str(err.value)


def test_preference_and_offline_exclude_each_other():
    with pytest.raises(ConfigError, match="config key 'offline'"):
        build_config(None, ["offline=true"], recipe="dpo")


# ----- the exact tabular lab -----------------------------------------------------------------
def test_hypo_bounds_the_mass_on_a_response_no_pair_contains_where_dpo_does_not():
    """A log-linear policy π(y) ∝ exp(θ·φ(y)) over {a, b, c}: the one pair is a ≻ b, and c — in no
    pair — shares a's feature (φ(c) = 2φ(a)); π_ref(c) = 0.01. DPO's loss falls as θ·φ(a) rises,
    which moves all the mass onto c (KL(π‖π_ref) → log 100). HyPO adds λ·KL(π‖π_ref), and as its
    objective starts at log 2 (DPO at π_ref) and the DPO loss is ≥ 0, its optimum has
    KL ≤ log 2/λ: the unseen response's mass stays bounded (HyPO's coverage argument)."""
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([0.495, 0.495, 0.01], dtype=torch.float64).log()
    spec, kl = PreferenceSpec(loss="dpo", beta=0.1), divergences.get("reverse_kl")
    found = {}
    for lam in (0.0, 0.2):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([theta], lr=1.0)
        for _ in range(5000):
            logp = (phi @ theta).log_softmax(-1)
            loss = pair_loss(spec, logp[None, :2], ref[None, :2]).mean() + lam * kl(logp, ref)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        found[lam] = (logp.detach().exp()[2].item(), kl(logp, ref).item())
    assert found[0.0][0] > 0.999 and found[0.0][1] > math.log(100) - 0.01  # DPO: all on c
    assert found[0.2][1] <= math.log(2) / 0.2 and found[0.2][0] < 0.05  # HyPO: bounded


def _expected_inpo_loss(spec, logits, sampler, ref, preference):
    """INPO's loss in expectation over pairs (y, y′) ~ π_t ⊗ π_t labelled y ≻ y′ with probability
    P[y, y′], through `pair_loss` — the function the trainer uses — on one-token responses."""
    k = len(sampler)
    i, j = (idx.flatten() for idx in torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij"))
    logp = logits.log_softmax(-1)
    weight = (sampler.exp()[:, None] * sampler.exp()[None, :]).flatten()

    def loss(chosen, rejected):
        stack = lambda v: torch.stack([v[chosen], v[rejected]], 1)  # noqa: E731
        return pair_loss(spec, stack(logp), stack(ref), stack(sampler))

    return (weight * (preference[i, j] * loss(i, j) + preference[j, i] * loss(j, i))).sum()


def test_inpo_loss_minimizer_is_the_documented_mirror_descent_step():
    gen = torch.Generator().manual_seed(3)
    k, eta, tau = 5, 1.0, 0.3
    spec = PreferenceSpec(loss="inpo", eta=eta, tau=tau, round_steps=1)
    upper = torch.rand(k, k, generator=gen, dtype=torch.float64).triu(1)
    preference = upper + (1 - upper.T).tril(-1) + 0.5 * torch.eye(k, dtype=torch.float64)  # general, intransitive
    ref = torch.randn(k, generator=gen, dtype=torch.float64).log_softmax(-1)
    sampler = torch.randn(k, generator=gen, dtype=torch.float64).log_softmax(-1)
    logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        loss = _expected_inpo_loss(spec, logits, sampler, ref, preference)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(
        logits.detach().log_softmax(-1), lab.inpo_step(sampler, ref, preference, eta, tau), atol=1e-7, rtol=0
    )


def test_inpo_iteration_reaches_the_regularized_nash_policy_and_with_tau_zero_the_condorcet_winner():
    gen = torch.Generator().manual_seed(4)
    k = 6
    reward = torch.rand(k, generator=gen, dtype=torch.float64) * 3
    preference = torch.sigmoid(reward[:, None] - reward[None, :])  # Bradley–Terry
    ref = torch.randn(k, generator=gen, dtype=torch.float64).log_softmax(-1)
    eta, tau = 2.0, 0.5
    policy = ref.clone()
    for _ in range(3000):
        policy = lab.inpo_step(policy, ref, preference, eta, tau)
    nash = (ref + preference @ policy.exp() / tau).log_softmax(-1)  # π* ∝ π_ref·exp(P(y ≻ π*)/τ)
    torch.testing.assert_close(policy, nash, atol=1e-9, rtol=0)
    policy = ref.clone()
    for _ in range(3000):
        policy = lab.inpo_step(policy, ref, preference, 0.5, 0.0)
    assert policy.exp()[reward.argmax()] > 0.99  # the win-rate maximizer


# ----- preference runs of the trainer ----------------------------------------------------------
def _overrides(tmp_path, say_task, *extra):
    return [
        "model=tiny",
        "dtype=float32",  # cached log-probs are checked against a plain float32 forward
        "steps=2",
        "max_new_tokens=5",
        "eval_size=2",
        "eval_samples=1",
        "train_size=20",
        "preference.prompts=6",
        "preference.samples=4",
        "preference.pairs_per_step=3",
        "lr=1e-3",
        f"output_dir={tmp_path / 'run'}",
        *say_task(range(24), "parity"),
        *extra,
    ]


def _args(tmp_path, say_task, recipe, *extra):
    overrides = _overrides(tmp_path, say_task, *extra)
    return ["train", "--recipe", recipe, *(a for o in overrides for a in ("--set", o))]


def _plain_logprob_sums(model, tokenizer, pairs):
    """Σ log π of each pair's completions from one plain forward of the full logits."""
    from divrl.tasks import encode_prompt

    sums = []
    for p in pairs:
        row = []
        for completion in (p.chosen, p.rejected):
            prompt = encode_prompt(tokenizer, p.prompt, None)
            ids = torch.tensor([prompt + completion])
            logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            row.append(logp.gather(1, torch.tensor(completion)[:, None]).sum())
        sums.append(torch.stack(row))
    return torch.stack(sums)


def test_a_dpo_step_trains_on_pairs_alone_with_cached_reference_log_probs_and_the_plain_gradient(
    tmp_path, say_task, monkeypatch, one_thread
):
    from divrl.trainer import Trainer

    cfg = build_config(None, _overrides(tmp_path, say_task), recipe="dpo")
    trainer = Trainer(cfg, log=lambda *_: None)
    assert trainer.reference is None  # no second model: the reference log-probs are cached
    pairs = preferences.load(trainer.run_dir, 0)
    assert pairs and pairs == trainer.pairs
    with torch.no_grad():
        cached = torch.tensor([p.reference for p in pairs])
        torch.testing.assert_close(
            cached, _plain_logprob_sums(trainer.model, trainer.tokenizer, pairs), atol=1e-4, rtol=0
        )
    batch = preferences.batch(trainer.pairs, 0, 3)
    plain = _plain_logprob_sums(trainer.model, trainer.tokenizer, batch)
    want = torch.autograd.grad(
        pair_loss(PreferenceSpec(loss="dpo", beta=0.1), plain, cached[: len(batch)]).mean(),
        list(trainer.model.parameters()),
    )
    monkeypatch.setattr(trainer, "_sample", lambda *a, **k: pytest.fail("a pairs-only step sampled"))
    trainer.optimizer.zero_grad()
    stats = trainer._preference_backward(0)
    for param, grad in zip(trainer.model.parameters(), want):
        torch.testing.assert_close(param.grad, grad, atol=1e-5, rtol=1e-4)
    assert stats["preference_loss"] == pytest.approx(math.log(2), abs=1e-5)  # πθ = π_ref at the start
    stats = trainer.train_step(0)
    assert stats["skipped_step"] == 0 and "reward" not in stats and stats["preference_pairs"] == len(pairs)


@pytest.mark.parametrize("recipe", ["dpo", "inpo"])
def test_a_resumed_preference_run_reads_its_pairs_back_and_repeats_the_uninterrupted_metrics(
    tmp_path, say_task, recipe
):
    extra = ["preference.round_steps=1"] if recipe == "inpo" else []
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main(_args(straight, say_task, recipe, "steps=3", *extra)) == 0
    assert main(_args(tmp_path, say_task, recipe, "steps=3", "checkpoint_every=1", *extra)) == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-3")  # resume from step 2
    assert main(_args(tmp_path, say_task, recipe, "steps=3", "checkpoint_every=1", "resume=true", *extra)) == 0
    rows = lambda path: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(run) == rows(straight / "run")
    rounds = sorted(p.name for p in (run / "preference_pairs").iterdir())
    assert rounds == (["round-0.json", "round-1.json", "round-2.json"] if recipe == "inpo" else ["round-0.json"])


@pytest.mark.parametrize("recipe", ["dpo", "inpo"])
def test_preference_recipes_train_lora_adapters_only(tmp_path, say_task, recipe, one_thread):
    """With LoRA the pairs' reference log-probs are the base model's (adapters off, or not yet
    trained), and a step changes adapter weights only."""
    from divrl import lora
    from divrl.trainer import Trainer

    extra = ["preference.round_steps=1"] if recipe == "inpo" else []
    cfg = build_config(None, _overrides(tmp_path, say_task, "steps=1", "lora={r: 4}", *extra), recipe=recipe)
    trainer = Trainer(cfg, log=lambda *_: None)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert (tmp_path / "run" / "checkpoints" / "step-1" / lora.ADAPTER_WEIGHTS).is_file()
    with torch.no_grad(), lora.forward_of(lora.AdaptersOff(trainer.model)) as base:
        pairs = preferences.load(trainer.run_dir, 0)
        assert pairs
        expected = _plain_logprob_sums(base, trainer.tokenizer, pairs)
    torch.testing.assert_close(torch.tensor([p.reference for p in pairs]), expected, atol=1e-4, rtol=0)


def test_a_file_pair_whose_prompt_overflows_the_context_is_refused_naming_it(tmp_path, say_task):
    from divrl.trainer import Trainer

    path = _write(
        tmp_path,
        [
            {"prompt": "Say 1", "chosen": "1", "rejected": "2"},
            {"prompt": "word " * 600, "chosen": "1", "rejected": "2"},
        ],
    )
    cfg = build_config(None, _overrides(tmp_path, say_task, f"preference.data={path}"), recipe="dpo")
    with pytest.raises(
        ConfigError,
        match=r"'preference.data': pair 2 of .*pairs.jsonl has a prompt of \d+ tokens, over the model's context of 512",
    ):
        Trainer(cfg, log=lambda *_: None)
