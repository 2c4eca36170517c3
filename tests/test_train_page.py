"""The training page in AppTest: a tiny run from URL settings, cached by settings, bad input shown
beside a working page, committed GPU results readable without a GPU."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TINY = {"routers": ["hash", "dense"], "E": "2", "layers": "1", "d": "16", "steps": "6",
        "batch": "2", "seq": "8", "tok": "byte", "dff": "8"}


def _page(**query):
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    return at.switch_page("app_pages/training.py").run()


def test_tiny_run_from_url_settings_then_cached():
    at = _page(**TINY)
    assert not at.exception
    assert at.number_input(key="steps").value == 6
    at.button[0].click().run()
    assert not at.exception, at.exception
    summary = at.dataframe[0].value
    assert list(summary["router"]) == ["hash", "dense"]
    assert (summary["val loss"] < 5.6).all()  # below ln(256) after 6 steps of bytes
    info = [i.value for i in at.info]
    assert any("Lowest final validation loss" in v and "Caveat" in v for v in info)
    again = _page(**TINY)  # a new session, same settings: the result shows without Run
    assert not again.exception and list(again.dataframe[0].value["router"]) == ["hash", "dense"]


def test_bad_input_is_named_and_page_keeps_working():
    at = _page(**{**TINY, "layers": "500"})  # over the engine's 64: the link's value is not used
    assert not at.exception
    assert "`layers=500` (using `2`)" in at.warning[0].value  # the default
    at = _page(**{**TINY, "seeds": "0,x"})
    assert any("Seeds" in e.value for e in at.error)
    at = _page(**{**TINY, "data": "upload"})
    assert any("upload" in e.value for e in at.error)


def test_committed_gpu_results_show_device_and_date():
    files = sorted((Path(APP).parent / "benchmarks" / "results").glob("train_*.json"))
    at = _page(**TINY)
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    if files:
        assert "Measured on" in text and "Compared at step" in text


def test_same_run_from_a_shell_is_the_pages_run():
    """The command the page prints parses to the settings the page runs, evaluation cadence and
    thread count included (a reduction split over threads rounds differently)."""
    import shlex

    from engine.cli import build_parser
    from engine.commands.train import settings_of
    from engine.train_loop import TrainSettings

    at = _page(**TINY)
    line = next(c.value for c in at.caption if "Same run from a shell" in c.value).split("`")[1]
    env, *argv = shlex.split(line)
    assert env == "OMP_NUM_THREADS=1" and argv[:3] == ["python", "-m", "engine"]
    got, text = settings_of(build_parser().parse_args(argv[3:]))
    want = TrainSettings(routers=("hash", "dense"), experts=2, layers=1, d_model=16, steps=6, batch=2,
                         seq_len=8, tokenizer="byte", d_expert=8, eval_every=1)
    assert text is None and got == want


def test_a_run_over_the_cpu_limit_is_refused_with_its_estimate():
    """100,000 steps of a small model: one step is timed, the estimate is far over the page's
    limit, so nothing trains and the error says how long and which inputs to lower."""
    at = _page(**{**TINY, "steps": "100000", "batch": "64", "seq": "64"})
    at.button[0].click().run()
    assert not at.exception
    err = " ".join(e.value for e in at.error)
    assert "This run would take about" in err and "2 runs of 100,000 Steps" in err and "lower Steps" in err
    # No summary of these routers (the committed GPU results' tables are on the page too).
    assert not any(list(d.value.get("router", [])) == ["hash", "dense"] for d in at.dataframe)


def test_estimate_counts_every_run_step_and_evaluation(monkeypatch):
    """estimate_seconds by hand: a probe step of 0.1 s; 3 routers x 2 seeds x (100 steps + (ceil(100 /
    25) + 2) evaluations x 4 batches / 3)."""
    import engine.train_loop as tl
    from engine.train_metrics import RunHistory

    def probe(s, corpus, router, seed, final_stats):
        assert s.steps == tl.PROBE_STEPS and router == "hash" and seed == 5 and not final_stats
        h = RunHistory(router, seed, 0, 0)
        h.train_seconds = 0.1 * tl.PROBE_STEPS
        return h

    monkeypatch.setattr(tl, "train_run", probe)
    monkeypatch.setattr(tl, "check_runs", lambda s, corpus: None)
    s = tl.TrainSettings(routers=("hash", "topk", "dense"), seeds=(5, 6), steps=100, eval_every=25,
                         eval_batches=4)
    total, step = tl.estimate_seconds(s, None)
    assert step == 0.1 and abs(total - 6 * 0.1 * (100 + 6 * 4 / 3)) < 1e-9


def test_a_run_with_expert_choice_says_its_loss_is_optimistic():
    at = _page(**{**TINY, "routers": ["hash", "expert_choice"]})
    at.button[0].click().run()
    assert not at.exception
    assert any("Expert Choice's loss is optimistic" in w.value for w in at.warning)
    plain = _page(**TINY)  # hash and dense: no such warning
    plain.button[0].click().run()
    assert not any("Expert Choice" in w.value for w in plain.warning)


def test_estimate_checks_the_run_before_its_probe_builds_a_model(monkeypatch):
    import pytest

    import engine.train_loop as tl

    def refuse(s, corpus):
        raise ValueError("this training run needs more memory than allowed")

    monkeypatch.setattr(tl, "check_runs", refuse)
    monkeypatch.setattr(tl, "train_run", lambda *a, **k: pytest.fail("probed before the checks"))
    with pytest.raises(ValueError, match="more memory"):
        tl.estimate_seconds(tl.TrainSettings(), None)


def test_inputs_allow_exactly_what_the_engine_accepts():
    from engine.train_data import tokenize
    from engine.train_fields import BPE_VOCAB, LIMITS
    from engine.train_loop import TrainSettings

    at = _page()
    bounds = {"E": "experts", "layers": "layers", "d": "d_model", "steps": "steps", "batch": "batch",
              "seq": "seq_len", "alpha": "alpha", "dff": "d_expert", "gamma": "gamma", "C": "capacity",
              "lr": "lr"}
    for key, name in bounds.items():
        widget = at.number_input(key=key)
        assert (widget.min, widget.max) == LIMITS[name], key
    assert (at.number_input(key="V").min, at.number_input(key="V").max) == BPE_VOCAB
    # Each bound passes the engine's own check; one past it is refused (the page's widgets hold
    # no value the run would refuse, and no smaller range than it takes).
    for name in ("experts", "layers", "d_model", "steps", "batch", "seq_len", "d_expert"):
        lo, hi = LIMITS[name]
        extra = {"moe_every": 1, "heads": 1} if name == "d_model" else {"heads": 1}
        for v in (lo, hi):
            TrainSettings(routers=("topk",), k=1, **extra, **{name: v})
        with pytest.raises(ValueError):
            TrainSettings(routers=("topk",), k=1, **extra, **{name: hi + 1})
    # The float ranges are closed too: each bound passes, a little beyond either is refused.
    for name, label in (("capacity", "capacity factor"), ("lr", "learning rate"), ("alpha", "alpha"),
                        ("gamma", "DeepSeek-V3 bias update speed")):
        lo, hi = LIMITS[name]
        for v in (lo, hi):
            TrainSettings(**{name: v})
        for v in (lo - abs(lo) * 0.01 - 1e-9, hi * 1.01):
            with pytest.raises(ValueError, match=f"^{label} must be"):
                TrainSettings(**{name: v})
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize("some text", "bpe", BPE_VOCAB[1] + 1)


def test_settings_both_labs_share_have_one_name():
    """The routing lab and the training lab call the same things the same: the balanced hash
    router's key, and DeepSeek-V3's bias speed (label on both pages, and in the engine's error)."""
    from engine import routing_lab, train_fields
    from engine.train_loop import TrainSettings

    shared = set(routing_lab.ROUTERS) & set(train_fields.ROUTERS)
    assert {"hash", "balanced_hash", "topk", "switch", "expert_choice", "deepseek"} <= shared
    label = routing_lab.PAGE_LABELS["bias_update_speed"]
    assert _page().number_input(key="gamma").label == label
    with pytest.raises(ValueError, match=f"^{label} must be <= 1.0"):
        TrainSettings(gamma=2.0)


def test_deepseek_rerun_note_quotes_the_committed_summaries():
    """The note shown with the float32 rerun states CVs that the committed files hold."""
    import json

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

    def cv(name: str, router: str = "deepseek") -> str:
        doc = json.loads((results / f"{name}.json").read_text())
        return f"{next(r for r in doc['summary'] if r['router'] == router)['CV']:.3f}"

    note = json.loads((results / "train_h200_2026-12-04_deepseek.json").read_text())["note"]
    for figure in (cv("train_h200_2026-12-03"), cv("train_h200_2026-12-04_deepseek"),
                   cv("train_h200_2026-12-03", "topk"), cv("train_h200_2026-12-04_deepseek_gamma0.001")):
        assert figure in note
    # Top-k's rerun reproduces the earlier sweep, as the note says.
    assert cv("train_h200_2026-12-04_deepseek", "topk") == cv("train_h200_2026-12-03", "topk")
