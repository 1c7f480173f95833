"""divrl.rollout.sample against HF generate and against the model's own next-token distribution."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from divrl.rollout import draw, nucleus, sample

VOCAB = 96
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and a second thread on a busy 2-core machine stalls
    at every parallel region (measured: 8 s instead of 0.15 s for one test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaked_llama() -> LlamaForCausalLM:
    """A 2-layer Llama over VOCAB tokens, seeded, whose next-token distributions are peaked."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # peaked next-token distributions, so greedy has clear winners
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return peaked_llama()


@pytest.fixture(scope="module")
def gpt2():
    """Absolute position embeddings: wrong position ids under left padding change its output
    (RoPE models are blind to a constant shift)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config).eval()


PROMPTS = [[5, 17, 33], [7, 8, 9, 10, 11, 12, 13, 14], [40], [21, 22, 23, 24, 25]]


def hf_greedy(model, prompt, max_new_tokens):
    """Greedy continuation of one unpadded prompt by HF generate (no stop token)."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


def truncate_at(tokens, stops):
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1], True
    return tokens, False


@pytest.mark.parametrize("arch", ["model", "gpt2"])
def test_low_temperature_matches_hf_greedy_with_stops_and_left_padding(arch, request):
    model = request.getfixturevalue(arch)
    n_new = 12
    references = [hf_greedy(model, p, n_new) for p in PROMPTS]
    # A stop token that ends some rows mid-way while others continue: exercises row dropping.
    mid_tokens = [r[n_new // 3] for r in references]
    stops = [mid_tokens[0], mid_tokens[2]]
    expected = [truncate_at(r, stops) for r in references]
    assert any(done for _, done in expected) and not all(len(t) == n_new for t, _ in expected)

    for temperature in (0.0, 1e-6):
        rollout = sample(
            model,
            PROMPTS,
            group_size=3,
            max_new_tokens=n_new,
            stop_token_ids=stops,
            pad_token_id=PAD,
            temperature=temperature,
            generator=torch.Generator().manual_seed(1),
        )
        assert rollout.group_size == 3 and rollout.prompt_ids == PROMPTS
        assert rollout.logprobs == [[0.0] * len(tokens) for tokens in rollout.completion_ids]  # b one-hot
        for i, (tokens, done) in enumerate(expected):
            for row in range(i * 3, i * 3 + 3):
                assert rollout.completion_ids[row] == tokens
                assert rollout.finished[row] == done


def reference_distribution(model, prompt, temperature, top_p):
    """softmax of the warped last-position logits, warped by HF's own logits processors."""
    logits = model(torch.tensor([prompt])).logits[:, -1]
    logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits.softmax(-1)[0]


def assert_matches(counts, probs):
    """Every token frequency within 5 Monte-Carlo standard errors (plus a tiny slack) of probs."""
    n = counts.sum()
    freq = counts / n
    tolerance = 5 * (probs * (1 - probs) / n).sqrt() + 1e-3
    assert torch.all((freq - probs).abs() <= tolerance), (freq - probs).abs().max()
    assert torch.all(counts[probs == 0] == 0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_first_token_distribution_matches_model(model, temperature, top_p):
    prompt = PROMPTS[1]
    n = 6000
    rollout = sample(
        model,
        [prompt],
        group_size=n,
        max_new_tokens=1,
        stop_token_ids=[],
        pad_token_id=PAD,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(2),
    )
    first = torch.tensor([c[0] for c in rollout.completion_ids])
    probs = reference_distribution(model, prompt, temperature, top_p)
    if top_p < 1.0:
        assert (probs == 0).any()  # the nucleus really cuts something
    assert_matches(torch.bincount(first, minlength=VOCAB).double(), probs.double())


def test_second_token_distribution_uses_the_expanded_cache(model):
    """Rows of a group share one prefilled cache; the second token must follow p(.|prompt, first)."""
    prompts = [PROMPTS[0], PROMPTS[1]]  # different lengths: the short one is left-padded
    n = 4000
    rollout = sample(
        model,
        prompts,
        group_size=n,
        max_new_tokens=2,
        stop_token_ids=[],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(3),
    )
    for i, prompt in enumerate(prompts):
        rows = rollout.completion_ids[i * n : (i + 1) * n]
        first = torch.tensor([r[0] for r in rows])
        common = torch.bincount(first).argmax().item()
        second = torch.tensor([r[1] for r in rows if r[0] == common])
        probs = reference_distribution(model, [*prompt, common], 1.0, 1.0)
        assert_matches(torch.bincount(second, minlength=VOCAB).double(), probs.double())


def test_seeded_generator_reproduces_and_rows_are_well_formed(model):
    stops = [3, 4, 5, 6]
    kwargs = dict(group_size=4, max_new_tokens=10, stop_token_ids=stops, pad_token_id=PAD, temperature=1.0)
    first = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    again = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    other = sample(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kwargs)
    assert first == again
    assert first.completion_ids != other.completion_ids
    assert len(first.completion_ids) == len(first.finished) == len(PROMPTS) * 4
    for tokens, done in zip(first.completion_ids, first.finished):
        assert 1 <= len(tokens) <= 10
        assert not any(t in stops for t in tokens[:-1])
        assert done == (tokens[-1] in stops)
        assert done or len(tokens) == 10


def behaviour_logprobs(model, prompt, completion, temperature, top_p):
    """log b(y_t) of each completion token from one full-sequence forward pass: log_softmax(logits / T),
    renormalized on the top-p nucleus (found by a full float64 sort) when top_p < 1.

    The sampler finds the nucleus in float32; a cut within float32 rounding (~1e-7) of some token's
    mass-before would make the two sets differ by that token, so the settings keep it 1e-6 away."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    logp = (logits.double() / temperature).log_softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = logp.exp().sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        assert (mass_before - top_p).abs().min() > 1e-6, "nucleus boundary within float32 rounding"
        in_nucleus = mass_before < top_p
        kept = torch.zeros_like(in_nucleus).scatter(1, order, in_nucleus)
        logp = logp.masked_fill(~kept, float("-inf")).log_softmax(dim=-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.05, 0.9), (0.05, 0.5)])
def test_logprobs_are_the_behaviour_distribution_of_each_sampled_token(tiny, temperature, top_p):
    """Real vocabulary (49152; at T = 0.05, top_p = 0.9 nuclei of 1 to ~1000 tokens, so `nucleus`
    widens past its first 256) and a stop set of a third of it, so rows leave the batch at
    different steps and must keep their log-probs."""
    model, tokenizer = tiny
    prompts = PROMPTS[:3]
    rollout = sample(
        model,
        prompts,
        group_size=3,
        max_new_tokens=8,
        stop_token_ids=range(0, len(tokenizer), 3),
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(4),
    )
    lengths = [len(tokens) for tokens in rollout.completion_ids]
    assert [len(logprobs) for logprobs in rollout.logprobs] == lengths
    assert min(lengths) < max(lengths)
    for row, (tokens, logprobs) in enumerate(zip(rollout.completion_ids, rollout.logprobs)):
        expected = behaviour_logprobs(model, prompts[row // 3], tokens, temperature, top_p)
        assert all(logprob <= 0.0 for logprob in logprobs)
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-5)


def test_nucleus_widens_until_it_holds_the_top_p_set():
    """With a first window of 2 tokens, nucleus must grow it and keep exactly HF's top-p set."""
    torch.manual_seed(4)
    logits = torch.randn(5, 300) * torch.tensor([0.1, 1.0, 2.0, 4.0, 8.0])[:, None]  # flat .. peaked
    for top_p in (0.3, 0.9, 0.99):
        weights, ids = nucleus(logits.softmax(-1), top_p, first_k=2)
        reference = TopPLogitsWarper(top_p)(None, logits.clone()).softmax(-1)
        kept = torch.zeros_like(reference).scatter_add(1, ids, weights)  # padding adds 0
        assert torch.equal(kept > 0, reference > 0)
        torch.testing.assert_close(kept / kept.sum(-1, keepdim=True), reference)


@pytest.mark.parametrize("block", [7, 20, 256])
def test_draw_follows_the_weights(block):
    """Block-wise inverse CDF, with block sizes that do (20) and do not (zero padding) divide the
    length."""
    weights = torch.rand(100) ** 3 * 5
    weights[[0, 13, 50, 99]] = 0.0
    n = 20000
    drawn = draw(weights.expand(n, -1), torch.Generator().manual_seed(5), block=block)
    assert_matches(torch.bincount(drawn, minlength=100).double(), (weights / weights.sum()).double())


def test_samples_in_eval_mode_and_restores_training_mode(gpt2):
    """GPT-2 has dropout: a model left in training mode must still sample from its eval network."""
    kwargs = dict(group_size=3, max_new_tokens=6, stop_token_ids=[], pad_token_id=PAD)
    gpt2.train()
    try:
        in_training = sample(gpt2, PROMPTS, generator=torch.Generator().manual_seed(9), **kwargs)
        assert gpt2.training
    finally:
        gpt2.eval()
    assert in_training == sample(gpt2, PROMPTS, generator=torch.Generator().manual_seed(9), **kwargs)


BAD_ARGUMENTS = [
    dict(prompt_ids=[[1], []]),
    dict(group_size=0),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(temperature=-1.0),
]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS)
def test_rejects_invalid_arguments(model, bad):
    kwargs = dict(prompt_ids=PROMPTS, group_size=2, max_new_tokens=3, stop_token_ids=[], pad_token_id=PAD) | bad
    with pytest.raises(ValueError):
        sample(model, **kwargs)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_entropies_are_those_of_the_teacher_forced_distribution(tiny, temperature):
    """with_entropy: H(softmax(z/T)) at every sampled position (T = 1 for greedy), as the exact
    chunked entropy of the same positions teacher-forced; rows leave the batch at different steps."""
    from divrl import chunked
    from divrl.hidden import completion_hidden
    from divrl.models import output_head

    model, tokenizer = tiny
    prompts = PROMPTS[:2]
    rollout = sample(
        model,
        prompts,
        group_size=3,
        max_new_tokens=6,
        stop_token_ids=range(0, len(tokenizer), 3),
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        generator=torch.Generator().manual_seed(1),
        with_entropy=True,
    )
    assert [len(e) for e in rollout.entropies] == [len(c) for c in rollout.completion_ids]
    with torch.no_grad():
        batch = completion_hidden(model, prompts, rollout.completion_ids, tokenizer.pad_token_id)
        _, expected = chunked.logprob_entropy(
            batch.hidden, output_head(model).at_temperature(temperature or 1.0), batch.tokens
        )
    got = torch.tensor([e for row in rollout.entropies for e in row])
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)
    assert (
        sample(
            model, prompts, group_size=1, max_new_tokens=2, stop_token_ids=[0], pad_token_id=tokenizer.pad_token_id
        ).entropies
        is None
    )


def seeded_sample(model, tokenizer):
    """3 completions of ≤ 8 tokens of each of PROMPTS, drawn with a fixed seed."""
    return sample(
        model,
        PROMPTS,
        group_size=3,
        max_new_tokens=8,
        stop_token_ids=[0],
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(3),
    )


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_packed_linears_give_the_plain_numbers(tiny, monkeypatch, autocast):
    """The oneDNN path of sampling (weights reordered once) computes the same logits as the plain
    layers to float32 rounding, samples the same completions, and leaves the model as it was.
    Under bf16 autocast the plain layers are F.linear on bf16-rounded inputs and weights, the rest
    in float32 (autocast off): within bf16 rounding of autocast's own logits."""
    from contextlib import nullcontext
    from functools import partial

    from divrl import rollout
    from divrl.models import replaced_forwards

    model, tokenizer = tiny
    ids = torch.tensor([PROMPTS[1]])
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]

    def bf16_linear(linear, x):
        return torch.nn.functional.linear(x.bfloat16(), linear.weight.bfloat16()).to(x.dtype)

    def plain_layers():
        return nullcontext() if autocast is None else replaced_forwards(linears, lambda m: partial(bf16_linear, m))

    def precision():
        return nullcontext() if autocast is None else torch.autocast("cpu", dtype=autocast)

    with torch.no_grad():
        with plain_layers():
            plain = model(ids).logits
        with precision():
            autocast_logits = model(ids).logits
            with rollout.packed_linears(model):
                assert any("forward" in m.__dict__ for m in model.modules())
                packed = model(ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, autocast_logits.float(), rtol=2e-2, atol=2e-2)

    with precision():
        fast = seeded_sample(model, tokenizer)
    monkeypatch.setattr(rollout, "packed_linears", lambda model: nullcontext())
    with plain_layers():
        slow = seeded_sample(model, tokenizer)
    assert fast.completion_ids == slow.completion_ids
    torch.testing.assert_close(
        torch.tensor([x for row in fast.logprobs for x in row]),
        torch.tensor([x for row in slow.logprobs for x in row]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_frozen_model_stored_in_bf16_samples_what_its_float32_original_samples(tiny):
    """Under bf16 autocast the sampler rounds float32 weights to bf16 before reordering them, so a
    frozen copy stored in bf16 (`models.frozen_for`: a teacher or reference that samples) gives
    the same completions and log-probs; its bf16 layers are packed too, not run on float32 inputs."""
    import copy

    from divrl.models import frozen_for

    model, tokenizer = tiny
    frozen = frozen_for("bf16", copy.deepcopy(model).requires_grad_(False))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        original, stored = seeded_sample(model, tokenizer), seeded_sample(frozen, tokenizer)
    assert stored.completion_ids == original.completion_ids
    assert stored.logprobs == original.logprobs


def stopping_at_many_steps(model, temperature=1.0, top_p=1.0, **options):
    """4 completions of ≤ 12 tokens of 3 prompts by a `peaked_llama`, drawn with a fixed seed and 9
    stop tokens: rows stop at many different steps."""
    return sample(
        model,
        [[5, 6, 7, 8], [9, 10], [11, 12, 13]],
        group_size=4,
        max_new_tokens=12,
        stop_token_ids=list(range(10, 91, 10)),
        pad_token_id=PAD,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(1),
        with_entropy=True,
        **options,
    )


def assert_same_rollouts(got, expected, tolerance=1e-5):
    assert got.completion_ids == expected.completion_ids and got.finished == expected.finished
    for key in ("logprobs", "entropies"):
        torch.testing.assert_close(
            torch.tensor([x for row in getattr(got, key) for x in row]),
            torch.tensor([x for row in getattr(expected, key) for x in row]),
            rtol=tolerance,
            atol=tolerance,
        )


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_a_static_batch_samples_what_the_shrinking_batch_samples(model, temperature, top_p):
    """`static` keeps stopped rows in the decode batch and attends the whole preallocated cache
    through a mask (the CUDA-graph path, here without the graph): the same completions, stops,
    log-probs and entropies as rows leaving the batch, with rows stopping at different steps."""
    import copy

    from divrl import attention

    plain_sdpa = attention.use(copy.deepcopy(model))
    shrinking, static = (stopping_at_many_steps(plain_sdpa, temperature, top_p, static=s) for s in (False, True))
    if temperature:
        assert len({len(c) for c in static.completion_ids}) > 3 and not all(static.finished)
    assert_same_rollouts(static, shrinking)


def test_a_static_batch_needs_plain_sdpa_attention(model):
    with pytest.raises(ValueError, match="static=True"):
        sample(model, [[5, 6]], group_size=2, max_new_tokens=3, stop_token_ids=[], pad_token_id=PAD, static=True)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_llama_decode_step_samples_what_the_forward_samples(model, monkeypatch, autocast):
    """On the CPU, with its linears packed, a Llama decodes through `llama_decode` instead of its
    forward: the same completions, stops, log-probs and entropies (float32 and bf16 linears), with
    prompts left-padded and rows stopping at many different steps."""
    import copy
    from contextlib import nullcontext

    from divrl import attention, llama_decode

    plain_sdpa = attention.use(copy.deepcopy(model))
    steps = []
    lean_step = llama_decode.next_logits
    monkeypatch.setattr(llama_decode, "next_logits", lambda *args: steps.append(len(args[2])) or lean_step(*args))
    with nullcontext() if autocast is None else torch.autocast("cpu", dtype=autocast):
        lean = stopping_at_many_steps(plain_sdpa)
        monkeypatch.setattr(llama_decode, "supports", lambda model: False)
        forward = stopping_at_many_steps(plain_sdpa)
    assert len(steps) == 11 and len(set(steps)) > 3  # every step after the first, on fewer and fewer rows
    assert_same_rollouts(lean, forward)


def test_llama_decode_takes_only_the_models_whose_forward_it_repeats(model, gpt2):
    import copy

    from divrl import attention, llama_decode

    plain_sdpa = attention.use(copy.deepcopy(model))
    assert llama_decode.supports(plain_sdpa)
    assert not llama_decode.supports(model)  # transformers' SDPA: its forward attends another way
    assert not llama_decode.supports(attention.use(copy.deepcopy(gpt2)))
    assert not llama_decode.supports(copy.deepcopy(plain_sdpa).to(torch.bfloat16))

    class Adapted(torch.nn.Linear):  # a LoRA-style wrapper computes more than its weight's product
        pass

    wrapped = copy.deepcopy(plain_sdpa)
    q_proj = wrapped.model.layers[1].self_attn.q_proj
    wrapped.model.layers[1].self_attn.q_proj = Adapted(q_proj.in_features, q_proj.out_features, bias=False)
    assert not llama_decode.supports(wrapped)
