"""A config key whose value is a mapping of named fields (`{}` for every default, null for off),
read into a frozen dataclass of those fields: `from_mapping`."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], value: Any) -> T | None:
    """`cls(**value)`, or None for null; ValueError (naming the fields `cls` takes) for a value that
    is not a mapping or a mapping with an unknown field. The fields' values are the caller's to check."""
    if value is None:
        return None
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]  # cls is a dataclass
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of {', '.join(names)} (or {{}} for the defaults), got {value!r}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; it takes {', '.join(names)}")
    return cls(**value)
