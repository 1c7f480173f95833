"""divrl.chunked against the full-logits computation: float64 values and gradients for every
closed-form divergence and for log-prob/entropy, gradcheck, float32/bfloat16 accuracy, the
token_weights fast path, and no tensor larger than a tile or an input."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from divrl import chunked as chunked_module
from divrl import divergences
from divrl.chunked import divergence, logprob_entropy
from divergence_cases import POINTWISE_CASES

N, V, H = 13, 37, 5
CHUNKS = dict(chunk_tokens=4, chunk_vocab=10)  # smaller than N and V, not dividing them


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=gen).requires_grad_()
    weight = torch.randn(V, H, dtype=torch.float64, generator=gen).requires_grad_()
    tokens = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, tokens


@pytest.fixture
def target():
    """A teacher with another hidden size (H' = 7), sharper than the policy."""
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(N, 7, dtype=torch.float64, generator=gen),
        2.0 * torch.randn(V, 7, dtype=torch.float64, generator=gen),
    )


def _full_logits(hidden, weight):
    """(N, V) logits in the inputs' dtype, upcast to at least float32 (as chunked computes)."""
    return (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))


def full_logprob_entropy(hidden, weight, tokens, temperature=1.0):
    logp = torch.log_softmax(_full_logits(hidden, weight) / temperature, dim=-1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("used", ["both", "logprob", "entropy"])
def test_logprob_entropy_matches_full_logits(inputs, temperature, used):
    hidden, weight, tokens = inputs
    chunked = logprob_entropy(hidden, weight, tokens, temperature=temperature, **CHUNKS)
    full = full_logprob_entropy(hidden, weight, tokens, temperature)
    mix = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)

    def loss(logp, entropy):  # an unused output gets no gradient at all (None in backward)
        return {"both": logp * mix + entropy * mix.flip(0), "logprob": logp * mix, "entropy": entropy * mix}[used].sum()

    grads = [torch.autograd.grad(loss(*outputs), (hidden, weight)) for outputs in (chunked, full)]
    for got, want in zip([*chunked, *grads[0]], [*full, *grads[1]]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_logprob_entropy_gradcheck(inputs):
    hidden, weight, tokens = inputs
    assert torch.autograd.gradcheck(
        lambda h, w: logprob_entropy(h, w, tokens, temperature=0.9, **CHUNKS), (hidden, weight)
    )


def test_logprob_entropy_is_a_distribution_summary(inputs):
    """log-probs of all tokens sum (in prob) to 1; entropy lies in [0, log V]."""
    hidden, weight, _ = inputs
    every_token = torch.arange(V).repeat_interleave(2)
    logp, entropy = logprob_entropy(hidden[:2].repeat(V, 1), weight, every_token, **CHUNKS)
    total = logp.view(V, 2).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64))
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(float(V)))).all()


CLOSED_FORMS = [
    *POINTWISE_CASES,
    ("f_divergence", {"f": lambda t: (t - 1.0) ** 4, "f_prime_inf": math.inf}),
]


def full_divergence(name, hidden, weight, target_hidden, target_weight, **params):
    return divergences.get(name)(
        torch.log_softmax(_full_logits(hidden, weight), -1),
        torch.log_softmax(_full_logits(target_hidden, target_weight), -1),
        **params,
    )


@pytest.mark.parametrize("name, params", CLOSED_FORMS)
def test_divergence_matches_full_logits(inputs, target, name, params):
    hidden, weight, _ = inputs
    chunked = divergence(name, hidden, weight, *target, **CHUNKS, **params)
    full = full_divergence(name, hidden, weight, *target, **params)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-12)
    upstream = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)  # per-token loss weights
    for got, want in zip(
        torch.autograd.grad((chunked * upstream).sum(), (hidden, weight)),
        torch.autograd.grad((full * upstream).sum(), (hidden, weight)),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("alpha", {"alpha": 0.7})])
def test_divergence_gradcheck(inputs, target, name, params):
    hidden, weight, _ = inputs
    assert torch.autograd.gradcheck(
        lambda h, w: divergence(name, h, w, *target, **CHUNKS, **params), (hidden, weight), fast_mode=True
    )


@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("jsd", {"beta": 0.3})])
def test_token_weights_gradient_comes_from_the_forward(inputs, target, name, params, monkeypatch):
    hidden, weight, _ = inputs
    token_weights = torch.linspace(0.0, 1.0, N, dtype=torch.float64)  # token 0 masked out
    values = divergence(name, hidden, weight, *target, token_weights=token_weights, **CHUNKS, **params)
    full = full_divergence(name, hidden, weight, *target, **params)

    def no_recomputation(*args):
        raise AssertionError("the backward recomputed tiles despite a matching upstream gradient")

    monkeypatch.setattr(chunked_module, "_backprop_tiles", no_recomputation)
    for got, want in zip(
        torch.autograd.grad(0.37 * (values * token_weights).sum(), (hidden, weight)),
        torch.autograd.grad(0.37 * (full * token_weights).sum(), (hidden, weight)),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_token_weights_other_upstream_gets_the_exact_gradient(inputs, target):
    hidden, weight, _ = inputs
    token_weights = torch.ones(N, dtype=torch.float64)
    values = divergence("jsd", hidden, weight, *target, token_weights=token_weights, **CHUNKS)
    full = full_divergence("jsd", hidden, weight, *target)
    for got, want in zip(
        torch.autograd.grad(values.square().sum(), (hidden, weight)),
        torch.autograd.grad(full.square().sum(), (hidden, weight)),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_divergence_is_zero_against_itself_and_target_is_constant(inputs):
    hidden, weight, _ = inputs
    target_hidden, target_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone()
    value = divergence("reverse_kl", hidden, weight, target_hidden, target_weight, **CHUNKS)
    torch.testing.assert_close(value, torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    value.sum().backward()
    assert target_hidden.grad is None and hidden.grad is not None


def test_divergence_rejects_mismatched_shapes(inputs, target):
    hidden, weight, _ = inputs
    with pytest.raises(ValueError, match="share tokens and vocabulary"):
        divergence("reverse_kl", hidden, weight[:-1], *target)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.fixture
def one_thread():
    """Tiles then run on the calling thread, where a dispatch mode sees them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_no_tensor_grows_with_tokens_times_vocabulary(inputs, target, one_thread):
    hidden, weight, tokens = inputs
    tile = CHUNKS["chunk_tokens"] * CHUNKS["chunk_vocab"]
    with _LargestTensor() as record:
        logp, entropy = logprob_entropy(hidden, weight, tokens, **CHUNKS)
        value = divergence("jsd", hidden, weight, *target, **CHUNKS)
        fused = divergence("reverse_kl", hidden, weight, *target, token_weights=torch.ones(N), **CHUNKS)
        (logp + entropy + value + fused).sum().backward()
    # nothing larger than a tile or an input (the weight gradient is one)
    assert record.largest == max(tile, weight.numel(), target[1].numel()) < N * V


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype, floor", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_low_precision_is_as_accurate_as_full_logits(inputs, target, dtype, floor):
    """Against float64 on the same rounded inputs, chunked errors stay within 2× (+ floor) of
    the full-logits computation in the same dtype."""
    hidden, weight, tokens = (t.detach() for t in inputs)
    rounded = [t.to(dtype) for t in (hidden, weight, *target)]

    def outputs(h, w, th, tw, chunked):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        if chunked:
            values = (*logprob_entropy(h, w, tokens, **CHUNKS), divergence("jsd", h, w, th, tw, **CHUNKS))
        else:
            values = (*full_logprob_entropy(h, w, tokens), full_divergence("jsd", h, w, th, tw))
        weights = torch.linspace(0.5, 1.5, N, dtype=values[0].dtype)
        loss = sum((v * weights.roll(i)).sum() for i, v in enumerate(values))
        return (*values, *torch.autograd.grad(loss, (h, w)))

    reference = outputs(*(t.double() for t in rounded), chunked=False)
    chunked, full = outputs(*rounded, chunked=True), outputs(*rounded, chunked=False)
    for got, baseline, want in zip(chunked, full, reference):
        assert _relative_error(got, want) <= 2 * _relative_error(baseline, want) + floor


def test_autocast_and_mixed_dtypes(inputs, target):
    """Under autocast the tiles compute in autocast's dtype, exactly as on inputs cast to it by
    hand, and float32 master weights get float32 gradients; without autocast mixed dtypes promote."""
    hidden, weight, tokens = inputs
    hidden, weight = hidden.detach().float(), weight.detach().float().requires_grad_()
    target_hidden, target_weight = (t.float() for t in target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = (*logprob_entropy(hidden, weight, tokens, **CHUNKS),
                          divergence("jsd", hidden, weight, target_hidden, target_weight, **CHUNKS))
    (grad,) = torch.autograd.grad(sum(v.sum() for v in under_autocast), weight)
    assert grad.dtype == torch.float32
    bf16 = [t.bfloat16() for t in (hidden, weight, target_hidden, target_weight)]
    by_hand = (*logprob_entropy(bf16[0], bf16[1], tokens, **CHUNKS), divergence("jsd", *bf16, **CHUNKS))
    for got, want in zip(under_autocast, by_hand):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    mixed = logprob_entropy(hidden.bfloat16(), weight, tokens, **CHUNKS)
    promoted = logprob_entropy(hidden.bfloat16().float(), weight, tokens, **CHUNKS)
    for got, want in zip(mixed, promoted):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
