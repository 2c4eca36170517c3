"""`python -m engine <command>`: one sub-command per lab, printing a table or JSON (--json).

Each command lives in engine/commands/<name>.py and defines
    HELP: str                                  one line for `--help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> CommandResult
so the CLI reproduces exactly what a page shows, through the same engine calls.

`--help` must answer at once: a command module imports only the standard library at its top and
imports the engine (torch, scipy, pandas) inside run(). Flags whose allowed values or defaults come
from the engine default to None; run() checks them (engine.validation) and fills in the engine's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# Sub-command name -> module engine.commands.<name>; a missing module is skipped.
COMMANDS = ("route", "attention", "fit", "cost", "dispatch", "train")
# A missing value (NaN, None) in a printed table, and in the pages' tables (app_pages._ui.table):
# Streamlit's grid would write "None".
MISSING = "–"


@dataclass
class CommandResult:
    """What a command prints: titled tables (then titled text) for humans, one JSON document of
    the tables and `data` for --json; `text` words facts that `data` holds, so JSON leaves it out."""

    tables: dict[str, pd.DataFrame]
    data: dict[str, Any] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # a DataFrame (pandas imported lazily)
        return [_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command's sub-parser."""
    parser = argparse.ArgumentParser(prog="python -m engine", description="ScaleLab engine CLI")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"engine.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
        mod.add_arguments(p)
        # NAMES: the names a command's engine checks use -> its flags, so errors say what was typed.
        p.set_defaults(_run=mod.run, _names=getattr(mod, "NAMES", {}))
    return parser


def _print(result: CommandResult, as_json: bool) -> None:
    if as_json:
        doc = {**{k: _jsonable(v) for k, v in result.tables.items()}, **_jsonable(result.data)}
        print(json.dumps(doc, indent=2))
        return
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500):
        for title, table in result.tables.items():
            print(f"== {title}")
            # na_rep covers NaN only: None (object columns) is made NaN first.
            print(table.mask(table.isna()).to_string(index=False, na_rep=MISSING))
            print()
    for title, text in result.text.items():
        print(f"== {title}\n{text}\n")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command, print its result; bad input exits 2 with the message."""
    args = build_parser().parse_args(argv)
    try:
        try:
            result: CommandResult = args._run(args)
        except ValueError as exc:
            from engine.validation import relabel

            print(f"error: {relabel(str(exc), args._names)}", file=sys.stderr)
            return 2
        _print(result, args.json)
        sys.stdout.flush()
    except BrokenPipeError:
        # `python -m engine ... | head` closed the pipe: the reader has what it wanted. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
