"""divrl's GRPO update against TRL's own loss on one batch (TRL is in the `bench` extra; without it
these tests skip). The benchmark (`benchmarks/grpo_step.py`) compares the two trainers' speed on
one configuration; this checks that the configuration is the same learning rule: on the same
policy, reference, prompts, completions and rewards, divrl's gradient is TRL 1.16 `GRPOTrainer`'s
gradient of its `dapo` loss (token mean over the batch, a KL term to the reference at β, PPO clip
0.2, group-normalized advantages).

Which KL gradient: TRL's `use_bias_correction_kl` (default True) multiplies k3 by the
differentiable ratio πθ/πold, whose value is 1 on-policy but whose gradient adds k3·∇log πθ: the
sum is (log πθ − log πref)·∇log πθ, the reverse-KL gradient, which is divrl's `k3_st`. With it off,
TRL descends plain k3, whose gradient (1 − πref/πθ)·∇log πθ is forward KL's (methods.md C6), divrl's
`k3`. The two sides also differ by the ε of the advantage's std (TRL 1e-4, divrl 1e-6): 2e-4 of
the gradient here, inside the tolerance."""

import copy

import pytest
import torch

from divrl.config import build_config
from divrl.trainer import Trainer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

BETA, GROUP, PROMPTS = 0.5, 4, 2  # a β large enough that the KL term's gradient matters


def divrl_trainer(tmp_path, kl_estimator: str) -> Trainer:
    cfg = build_config(
        None,
        [
            "model=tiny",
            "dtype=float32",
            f"output_dir={tmp_path / 'run'}",
            f"prompts_per_step={PROMPTS}",
            f"group_size={GROUP}",
            f"micro_batch_size={PROMPTS * GROUP}",
            "max_new_tokens=6",
            "temperature=1.0",
            f"kl_coef={BETA}",
            f"kl_estimator={kl_estimator}",
            "clip_low=0.2",
            "clip_high=0.2",
            "max_grad_norm=0",
            "eval_size=2",
            "inspect_every=0",
        ],
    )
    return Trainer(cfg, log=lambda *_: None)


def trl_loss_gradients(
    model, tokenizer, reference, prompts, completions, rewards, bias_corrected_kl: bool, tmp_path
) -> dict[str, torch.Tensor]:
    """TRL's `_compute_loss` on the batch, backpropagated: its gradient per parameter name."""
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=6,
        beta=BETA,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        use_cpu=True,
        bf16=False,  # TRL's default is True: its forwards would run under bf16 autocast
        use_bias_correction_kl=bias_corrected_kl,
        report_to="none",
        save_strategy="no",
    )
    dataset = datasets.Dataset.from_list([{"prompt": "unused"}] * PROMPTS * GROUP)
    reference.save_pretrained(tmp_path / "reference")  # TRL loads its reference from the policy's path
    model.config._name_or_path = str(tmp_path / "reference")
    grpo = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    grpo.current_gradient_accumulation_steps = 1  # set by its training loop, read by the loss
    prompt_ids = torch.tensor([p for p in prompts for _ in range(GROUP)])  # equal lengths: no padding
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    with torch.no_grad():
        ref_logps = grpo._get_per_token_logps_and_entropies(grpo.ref_model, input_ids, attention_mask, width)[0]
    # its advantages, as `_generate_and_score_completions` computes them with scale_rewards="group"
    grouped = torch.tensor(rewards).view(-1, GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": completion_mask.sum(),
    }
    model.train()
    grpo._compute_loss(model, inputs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def grpo_gradients(kl_estimator: str, bias_corrected_kl: bool, tmp_path) -> tuple[dict, dict]:
    """(divrl's, TRL's) gradient per parameter name on one batch of the same perturbed policy."""
    trainer = divrl_trainer(tmp_path, kl_estimator)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy away from its reference, so that the k3 term has a gradient
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    vocab = trainer.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (5,), generator=generator).tolist() for _ in range(PROMPTS)]
    lengths = [3, 6, 1, 4, 6, 2, 5, 3]  # 6 = max_new_tokens: truncated; others end at the stop token
    stop = trainer.stop_ids[0]
    completions = [
        torch.randint(3, vocab, (n,), generator=generator).tolist()[: n - 1] + ([stop] if n < 6 else [5])
        for n in lengths
    ]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 1.0]
    theirs = trl_loss_gradients(
        copy.deepcopy(trainer.model),
        trainer.tokenizer,
        trainer.reference,
        prompts,
        completions,
        rewards,
        bias_corrected_kl,
        tmp_path,
    )

    ours: dict[str, torch.Tensor] = {}

    def capture(reason, outputs):
        ours.update((name, p.grad.clone()) for name, p in trainer.model.named_parameters() if p.grad is not None)
        trainer.optimizer.zero_grad(set_to_none=True)
        return reason, None

    trainer._optimizer_step = capture
    trainer._update(prompts, completions, rewards, None)
    return ours, theirs


def relative_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max(float((ours[n] - theirs[n]).norm() / theirs[n].norm()) for n in ours)


@pytest.mark.parametrize(("kl_estimator", "bias_corrected_kl"), [("k3", False), ("k3_st", True)])
def test_divrls_grpo_gradient_is_trls(kl_estimator, bias_corrected_kl, tmp_path):
    ours, theirs = grpo_gradients(kl_estimator, bias_corrected_kl, tmp_path)
    assert relative_difference(ours, theirs) < 1e-3
    assert all(g.abs().sum() > 0 for g in ours.values())


def test_trls_default_kl_gradient_is_not_plain_k3(tmp_path):
    """The pairing above is not vacuous: divrl's k3 against TRL's default is another gradient."""
    ours, theirs = grpo_gradients("k3", True, tmp_path)
    assert relative_difference(ours, theirs) > 1e-2  # 4% here, against < 1e-3 for the pairs above
