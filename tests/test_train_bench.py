"""benchmarks/bench_train.py --sweep on a CPU, tiny: every (router, seed) job runs in its own
process, and each job's settings name only its own router."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py")]
TINY = ["--data", "pydoc", "--vocab", "300", "--steps", "10", "--eval-every", "10", "--d-model", "16",
        "--layers", "1", "--heads", "2", "--d-expert", "16", "--batch", "2", "--seq-len", "16"]


def test_sweep_jobs_check_only_their_own_router(tmp_path):
    """k = 3 suits top-k and Expert Choice but not the hash routers of the default list: jobs that
    checked the default routers (as they did, so a GPU sweep failed on Expert Choice's CUDA graph)
    all refused, and the sweep had no run."""
    corpus = tmp_path / "c.pt"
    subprocess.run([*BENCH, "--save-corpus", str(corpus), "--data", "pydoc", "--vocab", "300"],
                   check=True, capture_output=True, cwd=ROOT)
    out = tmp_path / "sweep"
    subprocess.run([*BENCH, "--sweep", "--corpus", str(corpus), "--routers", "topk,expert_choice",
                    "--k", "3", "--seeds", "0", "--parallel", "2", "--time-limit", "60", *TINY,
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert sorted((r["router"], r["seed"]) for r in doc["runs"]) == [("expert_choice", 0), ("topk", 0)]
    assert all(r["step"][-1] == 10 for r in doc["runs"])
