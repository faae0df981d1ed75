"""The `python -m eval` command line: a registry of benchmark subcommands.

Each entry of COMMANDS is a module with `add_parser(benchmarks)`, which adds its subcommand to
the `benchmarks` subparsers and sets `run` (a function of the parsed arguments) as a default of
every parser that runs something. Adding a task family's eval is one package with such a module
and one line here (see eval/README.md, "Adding an evaluation").
"""

from __future__ import annotations

import argparse
import logging
import sys

from eval.guard import cli as guard_cli
from eval.mc_tasks import cli as mc_tasks_cli
from eval.truthfulqa import cli as truthfulqa_cli
from eval.truthfulqa import false_alarm

# In `python -m eval --help` order.
COMMANDS = (
    truthfulqa_cli,  # truthfulqa {mc,gen,sweep}
    mc_tasks_cli,  # mc
    false_alarm,  # false-alarm
    guard_cli,  # guard
)

DESCRIPTION = """`python -m eval truthfulqa {mc,gen,sweep} ...`, `python -m eval mc --task ...` and
`python -m eval false-alarm --artifact ...`: print a table, write JSON
(see eval/README.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=DESCRIPTION)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    for command in COMMANDS:
        command.add_parser(benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)
    return 0
