"""The command-line scheme shared by every entry point of the three packages.

Each job is ``python -m <package>.<module> [--config run.yaml] [key.sub=value ...]`` (so
``accelerate launch -m ...`` works too) and exposes ``main(argv=None)`` for tests. Logging goes through
`logging`; only the main process gets a handler at INFO, the others log warnings only.
"""
from __future__ import annotations

import argparse
import logging
from typing import TypeVar

from selftok.config import ConfigError, load_config

T = TypeVar("T")


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the standard ``--config`` file and dotted overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides applied after the YAML file, e.g. train.lr=1e-4")
    return parser


def parse_run_config(cls: type[T], parser: argparse.ArgumentParser,
                     argv: list[str] | None = None) -> tuple[T, argparse.Namespace]:
    """Parse argv, then load `cls` from ``--config`` plus overrides; config errors exit with status 2."""
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg, args


def setup_logging(main_process: bool = True, level: int = logging.INFO) -> None:
    """Configure root logging once per process: INFO on the main process, WARNING elsewhere."""
    logging.basicConfig(
        level=level if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
