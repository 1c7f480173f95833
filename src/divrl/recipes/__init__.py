"""Recipes: a paper's method as data — a YAML file of config keys shipped inside the package.

Each ``<name>.yaml`` here holds ``description`` (one line), ``paper`` (citation) and the config keys
the method sets; `divrl train --recipe NAME` starts from them, then the config file, then `--set`.
``extends: OTHER`` starts from another recipe's keys (a variant states only what differs).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

META_KEYS = ("description", "paper")


class RecipeError(ValueError):
    """An unknown or malformed recipe."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    paper: str
    config: dict[str, Any]


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load(name: str) -> Recipe:
    valid = names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown recipe '{name}'{hint} Valid recipes: {', '.join(valid)}")
    data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text())
    if not isinstance(data, dict) or any(key not in data for key in META_KEYS):
        raise RecipeError(f"recipe '{name}' must be a mapping with {' and '.join(META_KEYS)}")
    config = {k: v for k, v in data.items() if k not in (*META_KEYS, "extends")}
    if "extends" in data:
        config = {**load(data["extends"]).config, **config}
    return Recipe(name, str(data["description"]), str(data["paper"]), config)


def listing() -> str:
    """One line per recipe: name, description, paper."""
    recipes = [load(name) for name in names()]
    width = max(len(r.name) for r in recipes)
    return "\n".join(f"{r.name:<{width}}  {r.description} ({r.paper})" for r in recipes)
