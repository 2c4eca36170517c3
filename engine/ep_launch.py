"""Starting the expert-parallel workers: torchrun from Python with a bounded wall time, and each
worker's process group with timeouts, so that a bad world size or a dead rank ends in an error
that says so, never a hang.

Pure torch and stdlib: the GPU box runs the workers without pandas or streamlit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from engine.validation import check_int

ROOT = Path(__file__).resolve().parents[1]
MAX_CPU_PROCESSES = 8


def committed(pattern: str, directory: Path | None = None) -> list[dict]:
    """Every committed result matching `pattern` under benchmarks/results (or `directory`),
    newest first."""
    directory = directory or ROOT / "benchmarks" / "results"
    docs = [_read_json(str(p), p.stat().st_mtime_ns) for p in sorted(directory.glob(pattern))]
    return sorted(docs, key=lambda d: d.get("date", ""), reverse=True)


@functools.lru_cache(maxsize=64)
def _read_json(path: str, mtime_ns: int) -> dict:
    """A result file's document, parsed once per version of the file (pages ask on every rerun)."""
    return json.loads(Path(path).read_text())


class LaunchError(RuntimeError):
    """torchrun failed or exceeded its wall time; the message carries the workers' last output."""


def torchrun(module: str, args: list[str], processes: int, timeout_s: float, what: str) -> str:
    """Run `python -m module args` on `processes` local processes (gloo, OMP_NUM_THREADS=1) via
    torchrun; returns the output, or raises LaunchError naming `what` when torchrun fails or
    runs past `timeout_s` (then its whole process tree is killed)."""
    processes = check_int("processes", processes, 1, MAX_CPU_PROCESSES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(processes), "--max-restarts", "0", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Own session: on timeout the whole tree (torchrun and its workers) is killed at once.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise LaunchError(f"{what} did not finish within {timeout_s:.0f} s:\n{output[-2000:]}")
    if proc.returncode != 0:
        # The workers' own error (a bad setting, a rank that left), ahead of torchrun's report;
        # a rank's torch.distributed errors print with their module (DistBackendError, ...).
        # A native abort (SIGABRT) prints no Python error, only C++'s "terminate called ...".
        causes = [line for line in output.splitlines()
                  if re.match(r"(\[rank\d+\]: [\w.]*|\w*)(Error|Exception): ", line)
                  or "terminate called" in line]
        first = f"{causes[0]}\n" if causes else ""
        raise LaunchError(f"{what} failed (torchrun exit {proc.returncode}): {first}"
                          f"{output[-2000:]}")
    return output


def add_job_arguments(p: argparse.ArgumentParser, timeout_s: float, out_help: str) -> None:
    """The arguments of every worker's job: --backend, --timeout, --out, --fail-rank."""
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=timeout_s,
                   help="process-group timeout, seconds")
    p.add_argument("--out", type=Path, help=out_help)
    p.add_argument("--fail-rank", type=int, default=-1, help="fault injection: this rank exits")


def init_group(backend: str, timeout_s: float, fail_rank: int = -1,
               high_priority: bool = False) -> tuple[int, int, torch.device]:
    """Join the default process group of a torchrun job; returns (rank, world, device).

    backend: "auto" (NCCL if CUDA is there, else gloo), "gloo" or "nccl"; NCCL takes the GPU of
    the local rank and refuses a job with more local ranks than GPUs. Every collective fails after
    `timeout_s` seconds instead of hanging; gloo runs a monitored barrier first, which names a
    missing rank. fail_rank: fault injection, that rank dies at once without a word.
    high_priority: NCCL streams ahead of other work (the dispatch's exchanges).
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if local >= gpus:
            raise ValueError(f"--nproc-per-node must be <= the {gpus} GPUs of this machine for "
                             f"NCCL (one GPU per rank); local rank {local} has none")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = high_priority
        dist.init_process_group("nccl", timeout=timeout, device_id=device, pg_options=options)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    if rank == fail_rank:
        os._exit(3)  # as a crashed rank would
    if backend == "gloo":  # names the missing rank instead of hanging in the first collective
        dist.monitored_barrier(timeout=timeout)
    return rank, world, device


@contextlib.contextmanager
def in_group(cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """Run a rank's work, then `cleanup()` and leave the process group. After work that finished,
    the rank first waits for every other (a barrier): none tears down its connections while another
    still works in the group (a fresh-clone CI run once saw a gloo rank abort, SIGABRT without a
    Python error, in a check that otherwise passed). After an error it leaves at once."""
    finished = False
    try:
        yield
        finished = True
    finally:
        try:
            if cleanup is not None:
                cleanup()
            if finished:
                dist.barrier()
        finally:
            dist.destroy_process_group()
