"""Attention in float32 under bf16 autocast (`divrl.attention`), and frozen models stored in bf16
(`models.frozen_for`): the same attention, masks and outputs as the plain paths."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from divrl import attention, chunked
from divrl.models import frozen_for, output_head, tiny_config


def model(tie: bool) -> LlamaForCausalLM:
    config = tiny_config(96)
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def left_padded():
    """Two rows, the second left-padded by 3: the mask decides what the second row sees."""
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def logits(net, bf16: bool) -> torch.Tensor:
    ids, mask = left_padded()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return net(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_divrls_attention_outside_autocast_is_sdpa_with_its_masks(dtype):
    plain = model(tie=True)
    assert plain.config._attn_implementation == "sdpa"
    converted = attention.use(copy.deepcopy(plain), dtype)
    assert converted.config._attn_implementation == (attention.FLOAT32_SDPA if dtype == "float32" else attention.SDPA)
    assert torch.equal(logits(converted, bf16=False), logits(plain, bf16=False))


def test_divrls_sdpa_under_autocast_is_transformers_sdpa():
    plain = model(tie=True)
    assert torch.equal(logits(attention.use(copy.deepcopy(plain)), bf16=True), logits(plain, bf16=True))


def test_float32_attention_under_autocast_is_nearer_float32_than_bf16_attention():
    plain = model(tie=True)
    exact = logits(plain, bf16=False)
    bf16_attention = logits(plain, bf16=True)
    float32_attention = logits(attention.use(copy.deepcopy(plain), "float32"), bf16=True)
    assert not torch.equal(float32_attention, bf16_attention)  # the attention did change dtype
    scale = exact.abs().max()
    assert (float32_attention - exact).abs().max() < 0.05 * scale  # within bf16 rounding of the linears
    assert (float32_attention - exact).abs().mean() <= (bf16_attention - exact).abs().mean()


def test_use_bfloat16_undoes_float32_and_leaves_other_attention_implementations():
    net = attention.use(model(tie=True), "float32")
    assert attention.use(net, "bfloat16").config._attn_implementation == attention.SDPA
    net.config._attn_implementation = "eager"
    assert attention.use(net, "float32").config._attn_implementation == "eager"


@pytest.mark.parametrize("tie", [True, False])
def test_frozen_linears_in_bf16_give_autocasts_outputs_bit_for_bit(tie):
    plain = model(tie)
    frozen = frozen_for("bf16", copy.deepcopy(plain).requires_grad_(False))
    linears = [m for m in frozen.modules() if isinstance(m, torch.nn.Linear)]
    assert (plain.lm_head.weight is plain.get_input_embeddings().weight) == tie
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)  # a tied head gets its own bf16 copy
    assert frozen.get_input_embeddings().weight.dtype == torch.float32  # the residual stream stays float32
    assert all(p.dtype == torch.float32 for n, p in frozen.named_parameters() if "norm" in n)
    assert torch.equal(logits(frozen, bf16=True), logits(plain, bf16=True))
    hidden = torch.randn(5, plain.config.hidden_size, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([1, 5, 9, 40, 95])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the streamed head: the same numbers too
        streamed = [chunked.logprob_entropy(hidden, output_head(net), tokens) for net in (frozen, plain)]
    for got, want in zip(*streamed):
        assert torch.equal(got, want)


def test_frozen_for_float32_changes_nothing():
    net = model(tie=True)
    assert frozen_for("fp32", net) is net
    assert all(p.dtype == torch.float32 for p in net.parameters())


def weight_casts_and_grads(keep: bool):
    """Two micro-batches, each its own bf16 autocast region, forward and backward: the number of
    dtype casts of tensors shaped like the MLP's gate weight (the weights' casts to bf16 and their
    gradients' back to float32), the number of such weights, and the gradients."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    from divrl.models import casts_kept

    net = model(tie=True)
    ids, mask = left_padded()
    weight = net.model.layers[0].mlp.gate_proj.weight
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with casts_kept() if keep else nullcontext():
            for row in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = net(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits.float().sum()
                loss.backward()
    casts = sum(
        e.count
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == list(weight.shape)
    )
    shaped = sum(p.shape == weight.shape for p in net.parameters())
    return casts, shaped, {name: p.grad for name, p in net.named_parameters()}


def test_casts_kept_casts_each_weight_once_per_pass_with_the_same_gradients():
    once, n, kept = weight_casts_and_grads(keep=True)
    twice, _, plain = weight_casts_and_grads(keep=False)
    assert twice == 4 * n  # per micro-batch: each weight cast to bf16, its gradient back
    assert once == 3 * n  # the second micro-batch reads the first one's casts
    assert all(torch.equal(kept[name], plain[name]) for name in plain)
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("kv_heads", [1, 3, 9])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_query_is_sdpa_at_a_decode_step(kv_heads, mask_kind):
    """Query head h reads key/value head h // (9 / kv_heads), as SDPA's enable_gqa pairs them."""
    g = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(5, 9, 1, 16, generator=g), *torch.randn(2, 5, kv_heads, 12, 16, generator=g)
    attends = torch.ones(5, 1, 1, 12, dtype=torch.bool)
    attends[1, ..., :4] = False  # left padding
    attends[3, ..., :7] = False
    mask = {"none": None, "bool": attends, "additive": torch.zeros(5, 1, 1, 12).masked_fill(~attends, -1e9)}[mask_kind]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(attention.one_query(query, key, value, mask, 0.3), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", [attention.SDPA, attention.FLOAT32_SDPA])
def test_sampling_attends_through_one_query_with_sdpas_numbers(tiny, monkeypatch, implementation):
    """A rollout of the tiny model decodes through `one_query` (every step after the prefill) and
    samples the tokens, log-probabilities to float32 rounding, that SDPA's decode steps sample."""
    from divrl.rollout import sample

    model, tokenizer = tiny
    monkeypatch.setattr(model.config, "_attn_implementation", implementation)
    calls = []
    original = attention.one_query

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    def run():
        return sample(
            model,
            [[5, 6, 7, 8], [9, 10]],
            group_size=3,
            max_new_tokens=8,
            stop_token_ids=[0],
            pad_token_id=tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(3),
        )

    monkeypatch.setattr(attention, "one_query", counted)
    fast = run()
    assert len(calls) == 7 * model.config.num_hidden_layers  # 8 tokens: 7 decode steps after the prefill
    monkeypatch.setattr(attention, "_is_one_query_decode", lambda *_: False)
    plain = run()
    assert fast.completion_ids == plain.completion_ids
    for a, b in zip(fast.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
