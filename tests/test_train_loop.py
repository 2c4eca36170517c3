"""The training loop on a tiny corpus: loss falls for every router, E = 1 curves equal dense,
same seed same curves, a NaN loss stops the run with its curves, bad input is refused."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from engine.cli import main
from engine.train_data import tokenize
from engine.train_loop import TrainSettings, train, train_run
from engine.train_metrics import summary_table
from engine.train_fields import ROUTERS

TEXT = "the cat sat on the mat. the dog sat on the log. " * 60
TINY = dict(tokenizer="byte", d_model=32, layers=1, heads=2, experts=4, k=2, d_expert=32,
            steps=40, batch=8, seq_len=16, lr=1e-2, warmup=4, eval_every=20, eval_batches=2)


@pytest.fixture(scope="module")
def corpus():
    return tokenize(TEXT, "byte")


@pytest.mark.slow
def test_loss_falls_for_every_router(corpus) -> None:
    torch.set_num_threads(1)
    res = train(TrainSettings(routers=ROUTERS, **TINY), corpus)
    for run in res.runs:
        # Step 0 starts near ln(256) = 5.5 nats (uniform over bytes); this text has ~12 symbols,
        # so a model that learned anything is far below ln(12) = 2.5.
        assert run.step == [0, 20, 40]
        assert run.val_loss[0] > 4.5
        assert run.val_loss[-1] < 2.5, run.router
        assert run.stopped is None
    table = summary_table([r.as_dict() for r in res.runs])
    assert list(table["router"]) == list(ROUTERS)
    ec = table.set_index("router").loc["expert_choice"]
    assert ec["CV"] == pytest.approx(0.0)  # every expert takes exactly its capacity


def test_one_expert_curves_equal_dense(corpus) -> None:
    s = TrainSettings(routers=("topk", "dense"), **{**TINY, "experts": 1, "k": 1, "steps": 10,
                                                    "eval_every": 5, "alpha": 0.0})
    moe, dense = (train_run(s, corpus, r, 0, final_stats=False) for r in ("topk", "dense"))
    assert moe.val_loss == pytest.approx(dense.val_loss, rel=1e-4)


def test_same_seed_same_curves(corpus) -> None:
    s = TrainSettings(**{**TINY, "steps": 10, "eval_every": 5})
    a, b, c = (train_run(s, corpus, "deepseek", seed, final_stats=False) for seed in (3, 3, 4))
    assert a.val_loss == b.val_loss and a.cv == b.cv and a.bias_spread == b.bias_spread
    assert a.val_loss != c.val_loss


def test_nan_loss_stops_and_keeps_curves(corpus) -> None:
    s = TrainSettings(**{**TINY, "lr": 1e3, "warmup": 0, "eval_every": 1})
    run = train_run(s, corpus, "topk", 0)
    assert run.stopped and "nan" in run.stopped and "learning rate" in run.stopped
    assert 1 <= len(run.val_loss) < 41 and math.isfinite(run.val_loss[0])


@pytest.mark.parametrize("kw, field", [({"steps": 0}, "steps"), ({"steps": 10**6}, "steps"),
                                       ({"layers": 500}, "layers"), ({"lr": -1}, "learning rate"),
                                       ({"routers": ("nope",)}, "routers"),
                                       ({"seeds": ()}, "seeds")])
def test_bad_settings_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{**TINY, **kw})


@pytest.mark.parametrize("kw, why", [({}, "device must be cuda"),
                                     ({"device": "cuda"}, "dtype must be bf16"),
                                     ({"device": "cuda", "dtype": "bf16"}, "expert_choice"),
                                     ({"device": "cuda", "dtype": "bf16", "routers": ("topk",),
                                       "d_model": 60}, "multiples of 8")])
def test_cuda_graphs_refused_where_a_step_would_sync(kw: dict, why: str) -> None:
    # Checked in the settings, so no CUDA device is needed to see the refusal.
    with pytest.raises(ValueError, match=f"CUDA graphs: .*{why}"):
        TrainSettings(**{**TINY, "routers": ("topk", "expert_choice"), **kw, "cuda_graphs": True})


def test_memory_budget_refused_before_allocating(corpus, monkeypatch) -> None:
    s = TrainSettings(**{**TINY, "d_model": 4096, "heads": 32, "layers": 48, "experts": 256,
                         "d_expert": 8192})
    monkeypatch.setattr("engine.train_loop.MoELM", None)  # any model construction would fail
    with pytest.raises(ValueError, match="GiB"):
        train(s, corpus)


def test_text_shorter_than_one_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        train(TrainSettings(**TINY), tokenize("short text " * 5, "byte"))


@pytest.mark.slow
def test_cli_json_shape(capsys) -> None:
    rc = main(["train", "--routers", "hash,dense", "--steps", "4", "--eval-every", "2",
               "--tokenizer", "byte", "--d-model", "16", "--layers", "1", "--heads", "2",
               "--experts", "2", "--d-expert", "8", "--batch", "2", "--seq-len", "8",
               "--eval-batches", "1", "--json"])
    assert rc == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert out.err.startswith("estimated ") and "2 runs of 4 steps at" in out.err.splitlines()[0]
    assert [r["router"] for r in doc["runs"]] == ["hash", "dense"]
    for r in doc["runs"]:
        assert r["step"] == [0, 2, 4]
        assert all(len(r[k]) == 3 for k in ("train_loss", "val_loss", "cv"))
    assert doc["runs"][1]["cv"] == [None, None, None]  # dense: no experts to balance
    assert {row["router"] for row in doc["summary"]} == {"hash", "dense"}


@pytest.mark.parametrize("flag, field", [("steps", "steps"), ("experts", "experts"),
                                         ("layers", "layers"), ("d-model", "d_model"),
                                         ("seq-len", "seq_len"), ("batch", "batch"),
                                         ("gamma", "gamma"), ("vocab", "vocab")])
def test_cli_help_states_the_default_and_the_largest_value_the_engine_takes(capsys, flag, field):
    """`train --help` says "..., LO to HI (default D)": D is TrainSettings' default, HI the largest
    value the run accepts (one more is refused, naming the flag)."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help across lines
    name = flag.upper().replace("-", "_")
    # "--gamma GAMMA, --ds-speed GAMMA help ...": the help runs to the next flag.
    own = re.search(rf" --{flag} {name}(?:, --[\w-]+ {name})* (.*?)(?= --[a-z]|$)", text).group(1)
    hi = re.search(r"to ([0-9.]+) \(default ([0-9.]+)\)", own)
    default = getattr(TrainSettings(), field)
    assert float(hi.group(2)) == default
    top = type(default)(float(hi.group(1)))
    extra = {"heads": 1} if field == "d_model" else {}
    if field == "vocab":  # the BPE vocabulary: checked where the text is tokenized
        tokenize("some text to learn merges from", "bpe", top)
        with pytest.raises(ValueError, match="vocabulary"):
            tokenize("some text", "bpe", top + 1)
        return
    TrainSettings(routers=("topk",), k=1, **extra, **{field: top})
    bad = top + (1 if isinstance(top, int) else 0.5)
    assert main(["train", "--routers", "topk", "--k", "1", f"--{flag}", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --{flag} must be")


def test_deepseek_speed_takes_either_commands_flag() -> None:
    """`route --ds-speed` and `train --gamma` name one setting: each command takes both."""
    from engine.cli import build_parser
    from engine.commands.route import settings_from_args
    from engine.commands.train import settings_of

    parser = build_parser()
    for flag in ("--gamma", "--ds-speed"):
        assert settings_of(parser.parse_args(["train", flag, "0.03"]))[0].gamma == 0.03
        assert settings_from_args(parser.parse_args(["route", flag, "0.03"])).bias_update_speed == 0.03


def test_cli_bad_flag_exits_2(capsys) -> None:
    assert main(["train", "--experts", "0", "--steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --experts must be >= 1")  # as typed
    assert main(["train", "--routers", "hash", "--k", "3", "--steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --k must be >= 1 and <= 2, got 3")
