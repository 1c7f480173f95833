"""`divrl` command line: `divrl train [--recipe NAME] [CONFIG.yaml] [--set key=value ...]`,
`divrl recipes`, `divrl eval …`, `divrl compare …`, `divrl inspect …`, `divrl analyze …`, `divrl lab …`."""

from __future__ import annotations

import argparse
import sys

import yaml

from divrl.analyze_cli import add_parser as add_analyze
from divrl.compare import add_parser as add_compare
from divrl.eval_cli import add_parser as add_eval
from divrl.inspect_page import add_parser as add_inspect
from divrl.lab_cli import add_parser as add_lab


def _train(args: argparse.Namespace) -> int:
    from divrl.config import ConfigError, build_config, describe
    from divrl.models import ModelLoadError
    from divrl.run_dirs import config_name, point_latest, resolve_output_dir
    from divrl.tasks import TaskError

    if args.help_config:
        print(describe())
        return 0
    fresh = None
    try:
        cfg = build_config(args.config, args.set or [], recipe=args.recipe)
        cfg, fresh = resolve_output_dir(cfg, config_name(args.config, args.recipe))
        print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
        from divrl.trainer import NonFiniteError, Trainer

        trainer = Trainer(cfg)
    except (ConfigError, TaskError, ModelLoadError) as err:
        if fresh is not None and not any(fresh.iterdir()):
            fresh.rmdir()  # a run that never started leaves no directory behind
        print(f"divrl: error: {err}", file=sys.stderr)
        return 2
    if fresh is not None:
        point_latest(fresh)
    from divrl.checkpoint import CheckpointWriteError

    try:
        trainer.run()
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointWriteError, NonFiniteError) as err:  # the message says what to do
        print(f"divrl: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {trainer.run_dir / 'report.md'}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from divrl import recipes

    print(recipes.listing())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model: policy gradient and/or divergence terms to any target")
    train.add_argument("config", nargs="?", help="YAML config file (keys: divrl train --help-config)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key (repeatable); dict keys as a.b=value",
    )
    train.add_argument(
        "--recipe",
        metavar="NAME",
        help="start from a recipe (list: divrl recipes); the config file and --set override it",
    )
    train.add_argument("--help-config", action="store_true", help="list every config key and exit")
    train.set_defaults(func=_train)
    listing = sub.add_parser("recipes", help="list the recipes: name, description, paper")
    listing.set_defaults(func=_recipes)
    add_eval(sub)
    add_compare(sub)
    add_inspect(sub)
    add_analyze(sub)
    add_lab(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
