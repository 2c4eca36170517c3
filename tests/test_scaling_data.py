"""engine.scaling_data and `python -m engine fit`: every bad input of issue 4, filters, generator, CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.cli import main
from engine.scaling_breakpoint import fit_breakpoint
from engine.scaling_data import (DATA_DIR, Filter, SyntheticSpec, generate_synthetic, load_dataset,
                                 parse_csv, select_xy)

GOOD = "n,loss,tag\n10,3.0,a\n20,2.5,b\n40,2.2,a\n80,2.0,b\n160,1.7,a\n"


def _select(text: str, **kw):
    return select_xy(parse_csv(text.encode()), "n", "loss", **kw)


@pytest.mark.parametrize("text, pattern", [
    (GOOD.replace("2.5", "nan"), r"column 'loss' must be finite: line 3"),
    (GOOD.replace("2.5", "inf"), r"column 'loss' must be finite: line 3"),
    (GOOD.replace("40,", "-40,"), r"column 'n' must be > 0 .*line 4"),
    (GOOD.replace("2.0", "0"), r"column 'loss' must be > 0 .*line 5"),
    (GOOD.replace("2.2", "abc"), r"column 'loss', line 4: 'abc' is not a number"),
    (GOOD.replace("1.7", ""), r"column 'loss', line 6: '' is not a number"),
    ("n,loss\n10,3\n20,2\n30,1\n", r"^need at least 4 distinct values of column 'n' for two segments, "
                                     r"got 3 \(10, 20, 30\) in 3 rows$"),
    ("n,loss\n10,3\n10,2\n10,1\n10,1\n", r"at least 4 distinct values of column 'n' .*got 1 \(10\) in 4"),
    (GOOD.replace("80,", "20,").replace("160,", "40,"), r"at least 4 distinct .*got 3 \(10, 20, 40\) in 5"),
])
def test_bad_values_name_the_column_and_line(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        _select(text)


def test_missing_column_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"column 'params' not found; columns are: n, loss, tag"):
        select_xy(parse_csv(GOOD.encode()), "params", "loss")


def test_upload_limits_and_unreadable_files():
    with pytest.raises(ValueError, match="over the 0 MiB limit"):
        parse_csv(GOOD.encode(), max_bytes=10)
    with pytest.raises(ValueError, match="UTF-8"):
        parse_csv(b"n,loss\n\xff\xfe,1\n")
    with pytest.raises(ValueError, match="no rows"):
        parse_csv(b"n,loss\n")
    with pytest.raises(ValueError, match="not a readable CSV"):
        parse_csv(b"")


def test_too_few_points_for_the_segments():
    sel = _select(GOOD)
    with pytest.raises(ValueError, match=r"2 \* min_segment = 6 distinct sizes for two segments, got 5"):
        fit_breakpoint(sel.x, sel.y, min_segment=3)


def test_unsorted_rows_are_accepted_and_keep_their_line_numbers():
    text = "n,loss\n80,2.0\n10,3.0\n40,2.2\n20,2.5\n160,1.7\n"
    sel = _select(text)
    assert sel.lines.tolist() == [2, 3, 4, 5, 6]
    assert fit_breakpoint(sel.x, sel.y).sse == pytest.approx(
        fit_breakpoint(np.sort(sel.x), sel.y[np.argsort(sel.x)]).sse, rel=1e-12)


def test_filters_keep_the_same_rows_as_pandas():
    df = load_dataset("chinchilla")
    sel = select_xy(df, "Training FLOP", "loss", (Filter.parse("tokens", "1e9", "5e9"),))
    ref = df[(df["tokens"] >= 1e9) & (df["tokens"] <= 5e9)]
    assert sorted(sel.x.tolist()) == sorted(ref["Training FLOP"].tolist())
    assert Filter.parse("tokens", "", " ") == Filter("tokens", None, None)
    with pytest.raises(ValueError, match="filter high bound for 'tokens' must be a number"):
        Filter.parse("tokens", "1", "lots")
    with pytest.raises(ValueError, match="filter low bound for 'tokens' must be a number"):
        Filter.parse("tokens", "nan", "")  # a NaN bound kept no row, and said only that
    with pytest.raises(ValueError, match=r"filter range for 'tokens': low 5e\+09 is above high 1e\+09"):
        Filter.parse("tokens", "5e9", "1e9")
    with pytest.raises(ValueError, match="keep no rows"):
        select_xy(df, "Training FLOP", "loss", (Filter("tokens", 1e30, None),))


def test_bundled_tables_are_the_shared_originals():
    shared = Path("/work/shared/data")
    for name in ("bnsl_4digit_addition.csv", "chinchilla_epoch_svg_extracted.csv"):
        if (shared / name).exists():
            assert (DATA_DIR / name).read_bytes() == (shared / name).read_bytes()
    df = load_dataset("chinchilla")
    assert len(df) == 245 and len(load_dataset("bnsl_4digit")) == 17
    assert df["tokens"].iloc[0] == pytest.approx(df["Training FLOP"].iloc[0] / (6 * df["Model Size"].iloc[0]))


def test_synthetic_generator_follows_its_formula_and_seed():
    spec = SyntheticSpec(n_points=9, x_min=1e6, x_max=1e10, breakpoint=1e8, slope_before=-0.1,
                         slope_after=-0.4, loss_at_break=2.0, noise=0.0)
    df = generate_synthetic(spec)
    x = 10.0 ** np.linspace(6, 10, 9)
    ref = 2.0 * np.where(x <= 1e8, (x / 1e8) ** -0.1, (x / 1e8) ** -0.4)
    assert df["params"].to_numpy() == pytest.approx(x, rel=1e-12)
    assert df["loss"].to_numpy() == pytest.approx(ref, rel=1e-12)
    noisy = SyntheticSpec(noise=0.02, seed=5)
    assert generate_synthetic(noisy).equals(generate_synthetic(noisy))
    assert not generate_synthetic(noisy).equals(generate_synthetic(SyntheticSpec(noise=0.02, seed=6)))
    with pytest.raises(ValueError, match="x_max must be > 1000000000"):
        generate_synthetic(SyntheticSpec(x_min=1e9, x_max=1e8))


def test_cli_fit_reproduces_the_engine_fit(capsys):
    assert main(["fit", "--dataset", "bnsl_4digit", "--json", "--n-boot", "100", "--n-sim", "19",
                 "--forms", "power,broken"]) == 0
    doc = json.loads(capsys.readouterr().out)
    df = load_dataset("bnsl_4digit")
    tr = df[df["split"] == "train"]
    m = fit_breakpoint(tr["training_dataset_size"], tr["test_cross_entropy"])
    assert doc["model"]["breakpoint"] == pytest.approx(m.breakpoint, rel=1e-12)
    assert doc["model"]["n"] == 14


def test_cli_reports_bad_csv_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(GOOD.replace("2.2", "oops"))
    assert main(["fit", str(path), "--x", "n", "--y", "loss"]) == 2
    assert "column 'loss', line 4: 'oops' is not a number" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "missing.csv"), "--x", "n", "--y", "loss"]) == 2
    capsys.readouterr()
    assert main(["fit", str(path), "--x", "n", "--y", "tag"]) == 2
    assert "column 'tag', line 2: 'a' is not a number" in capsys.readouterr().err


def test_cli_csv_with_filter_and_first_k_holdout(tmp_path, capsys):
    df = generate_synthetic(SyntheticSpec(n_points=20, noise=0.0))
    df["keep"] = np.arange(20)
    path = tmp_path / "syn.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--x", "params", "--y", "loss", "--filter", "keep::17",
                 "--holdout", "first_k", "--first-k", "12", "--n-boot", "50", "--n-sim", "0",
                 "--forms", "power", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["n"] == 12
    assert doc["model"]["breakpoint"] == pytest.approx(1e9, rel=1e-9)
    forms = pd.DataFrame(doc["forms (RMSLE in natural-log units)"])
    assert forms["form"].tolist() == ["power"]


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--n-boot", "5"), ("--level", "1.5"),
                                         ("--n-sim", "-3"), ("--min-segment", "1")])
def test_cli_names_the_flag_of_a_bad_number(flag, value, capsys):
    assert main(["fit", "--dataset", "bnsl_4digit", flag, value]) == 2
    assert f"{flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize("args, error", [
    (["--min-segment", "20"], "need at least 2 * --min-segment = 40 distinct sizes"),
    (["--holdout", "first_k", "--first-k", "200"], "--first-k must be >= 4 and <= 17, got 200"),
])
def test_cli_names_the_flag_of_a_number_the_data_refuses(args, error, capsys):
    assert main(["fit", "--dataset", "bnsl_4digit", *args]) == 2
    assert error in capsys.readouterr().err


def test_minimum_sizes_are_stated_the_same_way():
    """One phrasing: the fit needs 4 distinct sizes, the test and intervals 5 rows ('at least')."""
    from engine.scaling_breaktest import break_test
    from engine.scaling_intervals import profile_interval

    x, y = np.array([10.0, 20, 40, 80]), np.array([3.0, 2.5, 2.2, 2.0])
    assert fit_breakpoint(x, y).n == 4
    for fn in (break_test, profile_interval):
        with pytest.raises(ValueError, match=r"^need at least 5 points .*got 4$"):
            fn(x, y)
