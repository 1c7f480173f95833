"""`divrl` command line: `divrl train [--recipe NAME] [CONFIG.yaml] [--set key=value ...]`,
`divrl recipes`, `divrl eval …`, `divrl compare …`, `divrl inspect …`, `divrl analyze …`, `divrl lab …`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from divrl.analyze_cli import add_parser as add_analyze
from divrl.compare import add_parser as add_compare
from divrl.eval_cli import add_parser as add_eval
from divrl.inspect_page import add_parser as add_inspect
from divrl.lab_cli import add_parser as add_lab


def _resolve_output_dir(cfg, name: str):
    """`divrl.run_dirs.resolve_output_dir`; in a data-parallel launch (`divrl.distributed`) rank 0
    resolves it (a fresh directory is made once) and every rank gets its answer."""
    from divrl import distributed
    from divrl.config import ConfigError
    from divrl.run_dirs import resolve_output_dir

    here = distributed.world()
    if not here.parallel:
        return resolve_output_dir(cfg, name)
    distributed.check_config(cfg, here)  # before any collective: every rank refuses alike
    distributed.init(cfg.device)
    outcome: tuple = ("error", "rank 0 did not resolve output_dir")
    if here.main:
        try:
            resolved, fresh = resolve_output_dir(cfg, name)
            outcome = ("ok", resolved.output_dir, fresh)
        except ConfigError as err:
            outcome = ("error", str(err))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    return dataclasses.replace(cfg, output_dir=outcome[1]), outcome[2] if here.main else None


def _train(args: argparse.Namespace) -> int:
    from divrl import distributed
    from divrl.config import ConfigError, build_config, describe
    from divrl.models import ModelLoadError
    from divrl.run_dirs import config_name, point_latest
    from divrl.tasks import TaskError

    if args.help_config:
        print(describe())
        return 0
    here = distributed.launched()
    error = "divrl: error:" if here.main else f"divrl (rank {here.rank}): error:"
    fresh = None
    try:
        cfg = build_config(args.config, args.set or [], recipe=args.recipe)
        cfg, fresh = _resolve_output_dir(cfg, config_name(args.config, args.recipe))
        if here.main:
            print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
        from divrl.trainer import NonFiniteError, Trainer

        trainer = Trainer(cfg)
    except (ConfigError, TaskError, ModelLoadError) as err:
        if fresh is not None and not any(fresh.iterdir()):
            fresh.rmdir()  # a run that never started leaves no directory behind
        print(f"{error} {err}", file=sys.stderr)
        return 2
    if fresh is not None:
        point_latest(fresh)
    from divrl.checkpoint import CheckpointWriteError

    try:
        trainer.run()
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointWriteError, NonFiniteError) as err:  # the message says what to do
        print(f"{error} {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if here.main:
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
