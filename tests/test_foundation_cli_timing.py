"""The CLI dispatcher and the timing helper, checked against hand-computed values."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from engine.cli import CommandResult, _jsonable, build_parser, main
from engine.timing import alternating, summarize, time_fn

ROOT = Path(__file__).resolve().parents[1]


def test_cli_help_lists_every_installed_command():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    present = [p.stem for p in (ROOT / "engine" / "commands").glob("*.py") if p.stem != "__init__"]
    for name in present:
        assert name in out.stdout


HEAVY = ("torch", "scipy", "pandas", "numpy")
_HELP_PROBE = """
import runpy, sys
sys.argv = ["engine", *sys.argv[1:]]
try:
    runpy.run_module("engine", run_name="__main__")
except SystemExit:
    pass
print("HEAVY", *sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("command", ["", *(p.stem for p in sorted((ROOT / "engine" / "commands").glob("*.py"))
                                          if p.stem != "__init__")])
def test_help_imports_no_heavy_library(command):
    """`--help` of the CLI and of every command loads neither torch, scipy, pandas nor numpy: a
    command module imports the engine inside run(), so help answers at once."""
    argv = [command, "--help"] if command else ["--help"]
    out = subprocess.run([sys.executable, "-c", _HELP_PROBE.format(heavy=HEAVY), *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m engine" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY", out.stdout[-300:]


def test_every_flag_of_every_command_has_help():
    """`python -m engine COMMAND --help` says what each flag does; none is listed bare."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [(name, action.dest) for name, parser in commands.choices.items()
            for action in parser._actions if not action.help]
    assert bare == []


def test_closed_pipe_ends_quietly():
    """`python -m engine ... | head`: the reader goes away before the output is written; the
    command exits 0 with nothing on stderr (no BrokenPipeError traceback)."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "cost", "--preset", "Mixtral 8x7B"],
                            cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)  # no reader left: the first write to stdout fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == "", err


def test_jsonable_turns_tables_and_nonfinite_into_json_values():
    df = pd.DataFrame({"a": [1, 2], "b": [0.5, math.inf]})
    assert _jsonable(df) == [{"a": 1, "b": 0.5}, {"a": 2, "b": None}]
    assert _jsonable({"x": (1, float("nan"))}) == {"x": [1, None]}


def _only_command(monkeypatch, run, add_arguments=lambda p: None):
    """Make `fake`, running `run(args)`, the CLI's only command."""
    import engine.cli as cli

    fake = SimpleNamespace(HELP="fake", add_arguments=add_arguments, run=run)
    monkeypatch.setattr(cli, "COMMANDS", ("fake",))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)


def test_main_reports_value_errors_with_exit_code_2(monkeypatch, capsys):
    def run(args):
        if args.n < 1:
            raise ValueError("n must be >= 1, got 0")
        return CommandResult({"t": pd.DataFrame({"n": [args.n]})}, {"ok": True})

    _only_command(monkeypatch, run, lambda p: p.add_argument("--n", type=int, default=1))
    assert main(["fake", "--n", "0"]) == 2
    assert "n must be >= 1" in capsys.readouterr().err
    assert main(["fake", "--n", "3", "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out


def test_tables_print_missing_values_as_a_dash_and_json_as_null(monkeypatch, capsys):
    """A missing value reads "–" in a printed table, as on the pages (not NaN or None); --json
    keeps null."""
    table = pd.DataFrame({"router": ["hash", None], "ms": [1.5, math.nan], "label": ["a", None],
                          "n": [3, 4]})
    _only_command(monkeypatch, lambda args: CommandResult({"t": table}))
    assert main(["fake"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [["==", "t"], ["router", "ms", "label", "n"], ["hash", "1.5", "a", "3"],
                    ["–", "–", "–", "4"], []]
    assert main(["fake", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"t": [
        {"router": "hash", "ms": 1.5, "label": "a", "n": 3},
        {"router": None, "ms": None, "label": None, "n": 4}]}


def test_summary_percentiles_by_hand():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    # Sorted 1..11: median 6; p10 index int(0.1*10)=1 -> 2; p90 index round(0.9*10)=9 -> 10.
    assert (t.median_ms, t.p10_ms, t.p90_ms, t.reps) == (6.0, 2.0, 10.0, 11)
    assert t.spread == pytest.approx((10 - 2) / 6)


def test_time_fn_calls_warmup_plus_reps_times_on_cpu():
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, reps=7)
    assert len(calls) == 9 and t.reps == 7 and t.median_ms >= 0
    with pytest.raises(ValueError, match="reps must be >= 1"):
        time_fn(lambda: None, reps=0)


def test_alternating_swaps_which_measurement_goes_first_every_round():
    calls = []

    def measure(name, value):
        return lambda: calls.append(name) or value

    a, b = alternating(measure("A", 1.0), measure("B", 2.0), rounds=3)
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert a == [1.0] * 3 and b == [2.0] * 3
