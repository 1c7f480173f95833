"""`divrl train` arguments of small runs of the tiny model, shared by the tests."""

# groups of 2 short completions, 2 held-out prompts sampled once, a 20-prompt training split
TINY_RUN = ["model=tiny", "group_size=2", "max_new_tokens=4", "eval_size=2", "eval_samples=1", "train_size=20"]

ONE_TINY_STEP = [
    "steps=1",
    "prompts_per_step=2",
    "group_size=2",
    "max_new_tokens=4",
    "eval_size=2",
    "eval_samples=2",
    "train_size=20",
]


def as_sets(*overrides: str) -> list[str]:
    """`--set key=value` arguments, one pair per override."""
    return [arg for override in overrides for arg in ("--set", override)]
