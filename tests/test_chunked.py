"""divrl.chunked against the full-logits computation: float64 values and gradients for every
closed-form divergence and for log-prob/entropy, with a bare weight and with a Head that has a
bias, scale, softcap and temperature; gradcheck, float32/bfloat16 accuracy, the token_weights fast
path, and no tensor larger than a tile or an input."""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from divergence_cases import POINTWISE_CASES
from divrl import chunked as chunked_module
from divrl import divergences
from divrl.chunked import Head, divergence, logprob_entropy

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


def logprob_entropy_of(logits, tokens):
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def full_logprob_entropy(hidden, weight, tokens, temperature=1.0):
    return logprob_entropy_of(_full_logits(hidden, weight) / temperature, tokens)


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


def divergence_of(name, logits, target_logits, **params):
    return divergences.get(name)(torch.log_softmax(logits, -1), torch.log_softmax(target_logits, -1), **params)


def full_divergence(name, hidden, weight, target_hidden, target_weight, **params):
    return divergence_of(name, _full_logits(hidden, weight), _full_logits(target_hidden, target_weight), **params)


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
    capped = Head(weight, torch.zeros(V, dtype=torch.float64, requires_grad=True), scale=1.3, softcap=2.5)
    with _LargestTensor() as record:
        logp, entropy = logprob_entropy(hidden, weight, tokens, **CHUNKS)
        value = divergence("jsd", hidden, weight, *target, **CHUNKS)
        fused = divergence("reverse_kl", hidden, weight, *target, token_weights=torch.ones(N), **CHUNKS)
        capped_logp, capped_entropy = logprob_entropy(hidden, capped, tokens, **CHUNKS)
        capped_value = divergence("jsd", hidden, capped, *target, **CHUNKS)
        capped_fused = divergence("reverse_kl", hidden, capped, *target, token_weights=torch.ones(N), **CHUNKS)
        outputs = (logp, entropy, value, fused, capped_logp, capped_entropy, capped_value, capped_fused)
        sum(outputs).sum().backward()
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


def test_a_confident_tokens_bf16_gradient_cancels_in_float32():
    """∂ log p_y / ∂z = onehot(y) − p: for p_y ≈ 1 the two terms cancel to 1 − p_y, which bf16
    cannot hold next to 1 (its step there is 2⁻⁸). z_y's gradient is added on the float32 tile
    before the cast, so bf16 inputs give float64's gradient to bf16 rounding of the small terms."""
    gen = torch.Generator().manual_seed(3)
    rows, width = 4, 8
    weight = 0.2 * torch.randn(V, width, dtype=torch.float64, generator=gen)
    weight[:rows] = 3.0 * torch.eye(rows, width, dtype=torch.float64)  # token y's own direction
    hidden = (3.0 * torch.eye(rows, width, dtype=torch.float64)).bfloat16()  # z_y = 9, the others ≈ 0
    weight, tokens = weight.bfloat16(), torch.arange(rows)
    reference_h, reference_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = full_logprob_entropy(reference_h, reference_w, tokens)[0]
    assert logp.exp().min() > 0.99  # confident: 1 − p_y < 0.01
    want = torch.autograd.grad(logp.sum(), (reference_h, reference_w))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = torch.autograd.grad(logprob_entropy(h, w, tokens, **CHUNKS)[0].sum(), (h, w))
    for g, expected in zip(got, want):
        assert _relative_error(g, expected) < 0.03


def test_autocast_and_mixed_dtypes(inputs, target):
    """Under autocast the tiles compute in autocast's dtype, exactly as on inputs cast to it by
    hand, and float32 master weights get float32 gradients, the float32 accumulation itself (not
    rounded through a bf16 copy of the gradient); without autocast mixed dtypes promote."""
    hidden, weight, tokens = inputs
    hidden, weight = hidden.detach().float(), weight.detach().float().requires_grad_()
    target_hidden, target_weight = (t.float() for t in target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = (
            *logprob_entropy(hidden, weight, tokens, **CHUNKS),
            divergence("jsd", hidden, weight, target_hidden, target_weight, **CHUNKS),
        )
    (grad,) = torch.autograd.grad(sum(v.sum() for v in under_autocast), weight, retain_graph=True)
    assert grad.dtype == torch.float32
    for value in under_autocast[:2], under_autocast[2:]:  # each call's gradient alone
        (alone,) = torch.autograd.grad(sum(v.sum() for v in value), weight, retain_graph=True)
        assert not torch.equal(alone, alone.bfloat16().float())  # float32 values, not bf16 ones
    bf16 = [t.bfloat16() for t in (hidden, weight, target_hidden, target_weight)]
    bf16[1].requires_grad_()
    by_hand = (*logprob_entropy(bf16[0], bf16[1], tokens, **CHUNKS), divergence("jsd", *bf16, **CHUNKS))
    for got, want in zip(under_autocast, by_hand):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    (grad_by_hand,) = torch.autograd.grad(sum(v.sum() for v in by_hand), bf16[1])
    torch.testing.assert_close(grad, grad_by_hand.float(), rtol=2e-2, atol=2e-2 * grad.abs().max().item())
    mixed = logprob_entropy(hidden.bfloat16(), weight, tokens, **CHUNKS)
    promoted = logprob_entropy(hidden.bfloat16().float(), weight, tokens, **CHUNKS)
    for got, want in zip(mixed, promoted):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(params=["softcap", "no_softcap"])
def heads(request, inputs, target):
    """Policy and target heads with a bias, a scale and a temperature, with or without a final
    softcap (small enough to bend the logits: |scale · lin| is ≈ 3 on average)."""
    _, weight, _ = inputs
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    target_bias = torch.randn(V, dtype=torch.float64, generator=gen)
    capped = request.param == "softcap"
    return (
        Head(weight, bias, scale=1.3, softcap=2.5 if capped else None, temperature=0.8),
        Head(target[1], target_bias, scale=0.6, softcap=4.0 if capped else None, temperature=1.1),
    )


def logits_by_hand(hidden, head):
    """z = softcap(scale · (hidden @ weight.T + bias)) / T, written out."""
    z = head.scale * (hidden @ head.weight.T + head.bias)
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z / head.temperature


def test_head_logits_follow_the_formula(inputs, heads):
    hidden, weight, _ = inputs
    head, _ = heads
    torch.testing.assert_close(head.logits(hidden), logits_by_hand(hidden, head), rtol=1e-12, atol=1e-12)
    plain = Head(weight)
    assert plain.vocab_size == V and plain.logits(hidden).equal(hidden @ weight.T)


@pytest.mark.parametrize("used", ["both", "logprob", "entropy"])
def test_logprob_entropy_with_a_head_matches_full_logits(inputs, heads, used):
    hidden, _, tokens = inputs
    head, _ = heads
    chunked = logprob_entropy(hidden, head, tokens, **CHUNKS)
    full = logprob_entropy_of(logits_by_hand(hidden, head), tokens)
    mix = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)

    def loss(logp, entropy):
        return {"both": logp * mix + entropy * mix.flip(0), "logprob": logp * mix, "entropy": entropy * mix}[used].sum()

    parameters = (hidden, head.weight, head.bias)
    grads = [torch.autograd.grad(loss(*outputs), parameters) for outputs in (chunked, full)]
    for got, want in zip([*chunked, *grads[0]], [*full, *grads[1]]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name, params", CLOSED_FORMS)
def test_divergence_with_heads_matches_full_logits(inputs, target, heads, name, params):
    hidden, _, _ = inputs
    head, target_head = heads
    chunked = divergence(name, hidden, head, target[0], target_head, **CHUNKS, **params)
    full = divergence_of(name, logits_by_hand(hidden, head), logits_by_hand(target[0], target_head), **params)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-12)
    upstream = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
    parameters = (hidden, head.weight, head.bias)
    for got, want in zip(
        torch.autograd.grad((chunked * upstream).sum(), parameters),
        torch.autograd.grad((full * upstream).sum(), parameters),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_head_gradcheck(inputs, target, heads):
    hidden, weight, tokens = inputs
    head, target_head = heads

    rows = slice(0, 6)  # still two row chunks

    def outputs(h, w, b):
        policy = Head(w, b, head.scale, head.softcap, head.temperature)
        return (
            *logprob_entropy(h, policy, tokens[rows], **CHUNKS),
            divergence("jsd", h, policy, target[0][rows], target_head, beta=0.3, **CHUNKS),
        )

    small_hidden = hidden[rows].detach().requires_grad_()
    assert torch.autograd.gradcheck(outputs, (small_hidden, weight, head.bias), fast_mode=True)


@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("jsd", {"beta": 0.3})])
def test_token_weights_fast_path_with_heads(inputs, target, heads, name, params, monkeypatch):
    hidden, _, _ = inputs
    head, target_head = heads
    token_weights = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    values = divergence(name, hidden, head, target[0], target_head, token_weights=token_weights, **CHUNKS, **params)
    full = divergence_of(name, logits_by_hand(hidden, head), logits_by_hand(target[0], target_head), **params)

    def no_recomputation(*args):
        raise AssertionError("the backward recomputed tiles despite a matching upstream gradient")

    monkeypatch.setattr(chunked_module, "_backprop_tiles", no_recomputation)
    parameters = (hidden, head.weight, head.bias)
    for got, want in zip(
        torch.autograd.grad(0.37 * (values * token_weights).sum(), parameters),
        torch.autograd.grad(0.37 * (full * token_weights).sum(), parameters),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_divergence_with_heads_is_zero_against_itself_and_target_is_constant(inputs, heads):
    hidden, _, _ = inputs
    head, _ = heads
    target_hidden = hidden.detach().clone().requires_grad_()
    target_head = Head(
        head.weight.detach().clone().requires_grad_(),
        head.bias.detach().clone().requires_grad_(),
        head.scale,
        head.softcap,
        head.temperature,
    )
    value = divergence("reverse_kl", hidden, head, target_hidden, target_head, **CHUNKS)
    torch.testing.assert_close(value, torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    value.sum().backward()
    assert target_hidden.grad is None and target_head.weight.grad is None and target_head.bias.grad is None
    assert hidden.grad is not None and head.bias.grad is not None


def test_a_bare_weight_is_a_head_and_a_head_keeps_its_temperature(inputs):
    hidden, weight, tokens = inputs
    by_weight = logprob_entropy(hidden, weight, tokens, temperature=0.7, **CHUNKS)
    by_head = logprob_entropy(hidden, Head(weight).at_temperature(0.7), tokens, **CHUNKS)
    for got, want in zip(by_head, by_weight):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at_temperature"):
        logprob_entropy(hidden, Head(weight), tokens, temperature=0.7)
    with pytest.raises(ValueError, match=r"bias \(V,\)"):
        Head(weight, torch.zeros(V - 1))
    detached = Head(weight, torch.zeros(V, requires_grad=True)).detach()
    assert not detached.weight.requires_grad and not detached.bias.requires_grad


def test_autocast_casts_the_bias_like_the_weight(inputs, target, heads):
    """Under autocast a float32 head computes in bfloat16 exactly as the same head cast by hand,
    and its bias gets a float32 gradient."""
    hidden, _, tokens = inputs
    head, target_head = heads
    hidden = hidden.detach().float()
    as_float = Head(
        head.weight.detach().float(),
        head.bias.detach().float().requires_grad_(),
        head.scale,
        head.softcap,
        head.temperature,
    )
    target_hidden = target[0].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = (
            *logprob_entropy(hidden, as_float, tokens, **CHUNKS),
            divergence("jsd", hidden, as_float, target_hidden, target_head, **CHUNKS),
        )
    (grad,) = torch.autograd.grad(sum(v.sum() for v in under_autocast), as_float.bias)
    assert grad.dtype == torch.float32
    bf16 = dataclasses.replace(
        as_float, weight=as_float.weight.detach().bfloat16(), bias=as_float.bias.detach().bfloat16()
    )
    target_bf16 = dataclasses.replace(
        target_head, weight=target_head.weight.bfloat16(), bias=target_head.bias.bfloat16()
    )
    by_hand = (
        *logprob_entropy(hidden.bfloat16(), bf16, tokens, **CHUNKS),
        divergence("jsd", hidden.bfloat16(), bf16, target_hidden.bfloat16(), target_bf16, **CHUNKS),
    )
    for got, want in zip(under_autocast, by_hand):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weight_gradient_accumulators_are_bounded(inputs, target, monkeypatch):
    """The token_weights fast path keeps one (V, H) accumulator per worker thread: no more than fit
    in the budget (16 threads × a 152k × 1536 float32 head would be 15 GB), with the same result."""
    weight = torch.empty(152_064, 1536, device="meta")
    assert chunked_module._accumulating_workers(16, weight, torch.float32) == 2
    assert chunked_module._accumulating_workers(16, weight, torch.float64) == 1
    assert chunked_module._accumulating_workers(3, torch.empty(V, H), torch.float32) == 3
    hidden, head_weight, _ = inputs
    token_weights = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    grads, used = {}, []
    in_parallel = chunked_module._in_parallel
    monkeypatch.setattr(
        chunked_module,
        "_in_parallel",
        lambda task, items, workers: (used.append(workers), in_parallel(task, items, workers)),
    )
    monkeypatch.setattr(chunked_module, "_workers", lambda n, device: 2)
    for budget in (chunked_module.ACCUMULATOR_BUDGET_BYTES, V * H * 8):  # as many workers as threads; one
        monkeypatch.setattr(chunked_module, "ACCUMULATOR_BUDGET_BYTES", budget)
        values = divergence("reverse_kl", hidden, head_weight, *target, token_weights=token_weights, **CHUNKS)
        grads[budget] = torch.autograd.grad((values * token_weights).sum(), (hidden, head_weight))
    assert used == [2, 1]  # the fused forward's workers; its backward was computed there
    first, second = grads.values()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [0, 3])
def test_token_weights_without_mass_give_a_zero_gradient(inputs, target, n):
    """An empty batch (N = 0) or all-zero token weights: Σ w² = 0 leaves no proportion c for the fast
    path (0/0 = NaN times the precomputed gradient was the bug); the gradient is exactly 0."""
    hidden, weight, _ = inputs
    target_hidden, target_weight = target
    token_weights = torch.zeros(n, dtype=torch.float64)
    values = divergence(
        "reverse_kl", hidden[:n], weight, target_hidden[:n], target_weight, token_weights=token_weights, **CHUNKS
    )
    grad_hidden, grad_weight = torch.autograd.grad((values * token_weights).sum(), (hidden, weight))
    assert torch.equal(grad_hidden, torch.zeros_like(hidden)) and torch.equal(grad_weight, torch.zeros_like(weight))


def test_logprob_entropy_with_minus_inf_logits_matches_the_unmasked_vocabulary(inputs):
    """A bias of −inf masking the vocabulary from U on (tiles 20:30 partly, 30:37 wholly masked) is
    the distribution over the first U tokens: values and gradients of the unmasked head, 0 beyond U."""
    hidden, weight, tokens = inputs
    unmasked = 25
    tokens = tokens % unmasked
    bias = torch.zeros(V, dtype=torch.float64)
    bias[unmasked:] = -math.inf
    bias.requires_grad_()
    mix = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)

    def loss(logp, entropy):
        return (logp * mix + entropy * mix.flip(0)).sum()

    got = logprob_entropy(hidden, Head(weight, bias), tokens, **CHUNKS)
    want = logprob_entropy_of(Head(weight[:unmasked], bias[:unmasked]).logits(hidden), tokens)
    for got_value, want_value in zip(got, want):
        torch.testing.assert_close(got_value, want_value, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(loss(*got), (hidden, weight, bias))
    want_grads = torch.autograd.grad(loss(*want), (hidden, weight, bias))
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(got_grads[1][unmasked:], torch.zeros(V - unmasked, H, dtype=torch.float64))
