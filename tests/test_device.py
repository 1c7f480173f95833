"""`device`: config validation everywhere; the CUDA path where a CUDA device exists (`-m device`)."""

import copy

import pytest
import torch

from divrl.config import ConfigError, build_config
from divrl.models import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "gpu"])
def test_a_bad_device_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match="'device'"):
        build_config(None, [f"device={bad}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"'device'.*does not have"):
        build_config(None, ["device=cuda"])


def first_steps(tmp_path, overrides: list[str], recipe: str | None = None) -> dict:
    """{device: the metrics of step 1} of the same tiny run on the CPU and on CUDA, every model of
    each on its device. The CUDA run also recomputes its activations (`activation_checkpointing`),
    which must not change them."""
    from divrl.trainer import Trainer
    from test_trainer import tiny_cfg

    rows = {}
    for device in ("cpu", "cuda"):
        on = ["dtype=float32", f"device={device}", f"activation_checkpointing={device == 'cuda'}"]
        trainer = Trainer(tiny_cfg(tmp_path / device, *overrides, *on, recipe=recipe), log=lambda *_: None)
        for model in (trainer.model, trainer.reference, trainer.teacher):
            assert model is None or all(p.device.type == device for p in model.parameters())
        rows[device] = trainer.train_step(0)
    return rows


@pytest.mark.device
@cuda
def test_training_runs_on_cuda_with_the_numbers_of_the_cpu(tmp_path):
    """A tiny step with an exact (forward) and a sampled (reverse, k3) KL term on CUDA: the same
    sampled completions as on the CPU (the sampler draws its uniforms on the CPU generator), and
    metrics within float32 rounding of the CPU run's."""
    terms = (
        "terms=[{divergence: forward_kl, target: reference, coef: 0.1}, "
        "{divergence: reverse_kl, target: reference, coef: 0.1, estimator: k3}]"
    )
    rows = first_steps(tmp_path, [terms])
    for key in ("reward", "kl", "entropy", "grad_norm"):
        assert rows["cuda"][key] == pytest.approx(rows["cpu"][key], rel=1e-3, abs=1e-5), key


@pytest.mark.device
@cuda
@pytest.mark.parametrize("recipe", ["grpo", "dapo", "opd", "resrl", "entropy-gate", "sinkd", "chi2"])
def test_recipes_train_on_cuda_with_the_numbers_of_the_cpu(tmp_path, say_task, recipe):
    """A step of each of these recipes (a teacher, token weights, masks, Sinkhorn, χ²) on CUDA,
    against the same step on the CPU; rewards that vary within groups (the parity of a
    completion's length), so the policy gradient is not zero."""
    rows = first_steps(tmp_path, [*say_task(range(20), "parity"), "teacher=tiny"], recipe)
    assert rows["cpu"]["grad_norm"] > 0
    for key in ("reward", "loss", "grad_norm"):
        assert rows["cuda"][key] == pytest.approx(rows["cpu"][key], rel=1e-3, abs=1e-5), key


@pytest.mark.device
@cuda
def test_completion_hidden_and_sampling_agree_across_devices(tiny):
    from divrl.hidden import completion_hidden
    from divrl.rollout import sample

    model, tokenizer = tiny
    on_gpu = copy.deepcopy(model).cuda()  # the session's `tiny` stays on the CPU for later tests
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13], [14, 15], [16, 17, 18]]
    on_cpu = completion_hidden(model, prompts, completions, tokenizer.pad_token_id).hidden
    runs = [
        sample(
            m,
            prompts,
            group_size=3,
            max_new_tokens=6,
            stop_token_ids=[0],
            pad_token_id=tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(4),
        )
        for m in (model, on_gpu)
    ]
    on_cuda = completion_hidden(on_gpu, prompts, completions, tokenizer.pad_token_id).hidden
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
    assert runs[0].completion_ids == runs[1].completion_ids


@pytest.mark.device
@cuda
def test_chunked_heads_give_the_cpu_numbers_on_cuda():
    """The chunked log-probs, entropies and a divergence, with their gradients, on CUDA and on the CPU."""
    from divrl.chunked import divergence, logprob_entropy

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 32, generator=g), torch.randn(5000, 32, generator=g) / 4
    target_hidden, tokens = torch.randn(300, 32, generator=g), torch.randint(5000, (300,), generator=g)
    results = []
    for device in ("cpu", "cuda"):
        h, w = (t.detach().to(device).requires_grad_() for t in (hidden, weight))  # leaves on each device
        logp, entropy = logprob_entropy(h, w, tokens.to(device))
        d = divergence("forward_kl", h, w, target_hidden.to(device), weight.to(device))
        (logp.sum() + entropy.sum() + d.sum()).backward()
        results.append([t.detach().cpu() for t in (logp, entropy, d, h.grad, w.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.device
@cuda
def test_a_graphed_decode_samples_what_the_eager_decode_and_the_cpu_sample():
    """On CUDA the decode steps replay one CUDA graph (a `static` batch): no capture failure (its
    warning is an error here), and the completions, stops, log-probs and entropies of the eager
    CUDA decode (rows leaving the batch) and of the CPU."""
    import warnings

    from divrl import attention
    from test_rollout import assert_same_rollouts, peaked_llama, stopping_at_many_steps

    on_cpu = attention.use(peaked_llama())
    on_gpu = copy.deepcopy(on_cpu).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed = stopping_at_many_steps(on_gpu)
    eager, cpu = stopping_at_many_steps(on_gpu, static=False), stopping_at_many_steps(on_cpu)
    assert len({len(c) for c in graphed.completion_ids}) > 3
    assert_same_rollouts(graphed, eager, 1e-4)
    assert_same_rollouts(graphed, cpu, 1e-4)
