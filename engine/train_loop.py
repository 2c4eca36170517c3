"""The training lab's loop: every router trained from the same init on the same batches.

Same seed -> same attention/expert/embedding init (engine.train_model seeds per component), same
batches in the same order (engine.train_data.train_batches), same step (engine.train_step: AdamW,
warm-up then cosine decay, gradients clipped at norm 1). So curves differ only by the routing
rule. Every `eval_every` steps the validation split is scored and the routers' loads measured on
it (engine.train_metrics).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from engine.train_data import Corpus, check_fits, train_batches, val_batches
from engine.env_info import environment
from engine.train_fields import DTYPES, LIMITS, MOE_ROUTERS, ROUTERS, TrainFields
from engine.train_metrics import (RunHistory, eval_metrics, specialisation, summary_table,
                                  summary_text)
from engine.train_model import ModelConfig, MoELM, lm_loss
from engine.train_step import TrainStep
from engine.validation import MAX_BYTES, check_bytes, check_choice, check_float, check_int


@dataclass(frozen=True)
class TrainSettings(TrainFields):
    """One experiment (fields and defaults: TrainFields), checked before anything is allocated."""

    def __post_init__(self) -> None:
        if not self.routers:
            raise ValueError("routers must name at least one of " + ", ".join(ROUTERS))
        for r in self.routers:
            check_choice("routers", r, ROUTERS)
        check_int("steps", self.steps, *LIMITS["steps"])
        check_int("batch", self.batch, *LIMITS["batch"])
        check_float("learning rate", self.lr, *LIMITS["lr"])
        check_int("warm-up steps", self.warmup, *LIMITS["warmup"])  # capped at steps when used
        check_int("evaluate every", self.eval_every, *LIMITS["eval_every"])
        check_int("evaluation batches", self.eval_batches, *LIMITS["eval_batches"])
        lo, hi = LIMITS["seeds"]
        if not lo <= len(self.seeds) <= hi:
            raise ValueError(f"seeds must list {lo} to {hi} seeds")
        check_choice("dtype", self.dtype, DTYPES)
        if self.cuda_graphs:
            self._check_graphs()
        for r in self.routers:  # every field checked before anything is allocated
            self.model_config(r, self.seeds[0], self.vocab if self.tokenizer == "bpe" else 256)

    def _check_graphs(self) -> None:
        """A captured step must never wait for the host: only the sync-free path can be captured
        (engine.moe_dispatch.grouped_mm_runs: bf16, widths multiples of 8; Expert Choice reads its
        per-token width back to the host every step)."""
        why = ("device must be cuda" if not self.device.startswith("cuda") else
               "dtype must be bf16" if self.dtype != "bf16" else
               "expert_choice cannot be captured" if "expert_choice" in self.routers else
               "d_model and expert width must be multiples of 8"
               if self.d_model % 8 or self.d_expert % 8 else None)
        if why:
            raise ValueError(f"CUDA graphs: {why}")

    def model_config(self, router: str, seed: int, vocab: int) -> ModelConfig:
        """The ModelConfig of one run."""
        return ModelConfig(vocab, self.d_model, self.layers, self.heads, self.seq_len,
                           self.d_expert, self.experts, self.k, self.moe_every, router,
                           self.alpha, self.capacity, self.gamma, self.positions, "gelu", seed)

    def memory_bytes(self, vocab: int) -> float:
        """Rough peak bytes of the largest run: weights, grads, AdamW state, activations."""
        widest = max(self.routers, key=lambda r: self.model_config(r, 0, vocab).param_bytes())
        tokens = self.batch * self.seq_len
        act = tokens * (self.layers * (16 * self.d_model + 6 * self.k * self.d_expert) + 3 * vocab)
        return self.model_config(widest, 0, vocab).param_bytes() + 4.0 * act


def resolve_device(name: str) -> torch.device:
    """torch.device for "cpu" / "cuda[:N]"; ValueError naming the field if it is not here."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda is not available on this machine; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}")
    return dev


def train_run(s: TrainSettings, corpus: Corpus, router: str, seed: int,
              on_eval: Callable[[RunHistory], None] | None = None,
              final_stats: bool = True, deadline: float | None = None) -> RunHistory:
    """Train one router from seed `seed`; histories per evaluation, final loads and specialisation.

    A non-finite training loss stops the run at the next evaluation (losses are read only there,
    so the host never waits for the GPU between): `stopped` says so, the curves so far are kept.
    deadline (time.monotonic() seconds): stop at the first evaluation past it, saying so.
    """
    dev = resolve_device(s.device)
    cfg = s.model_config(router, seed, corpus.vocab)
    # Token frequencies build the balanced hash router's table; no other router reads them.
    freq = torch.bincount(corpus.train, minlength=corpus.vocab).double() if router == "balanced_hash" else None
    torch.manual_seed(seed)
    model = MoELM(cfg, freq).to(dev)
    total, active = model.param_counts()
    trainer = TrainStep(model, s.lr, min(s.warmup, s.steps), s.steps, s.dtype == "bf16",
                        graphs=s.cuda_graphs)
    batches = train_batches(corpus, s.batch, s.seq_len, s.steps, seed)
    if dev.type == "cuda":
        batches = batches.pin_memory()  # copies from pageable memory would wait for the GPU
    val = val_batches(corpus, s.batch, s.seq_len, s.eval_batches).to(dev)
    autocast = torch.autocast(dev.type, torch.bfloat16, enabled=s.dtype == "bf16")
    hist = RunHistory(router, seed, total, active)
    with torch.no_grad(), autocast:  # step 0: the starting point of every curve
        first = float(lm_loss(model(batches[0].to(dev))[0], batches[0].to(dev)))
        hist.record(0, first, math.nan, math.nan, eval_metrics(model, val))
    last_eval, t_train, diverged = 0, 0.0, False
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        trainer.step(step, batches[step - 1].to(dev, non_blocking=True))
        if step % s.eval_every == 0 or step == s.steps:
            ce, aux = trainer.take_means()  # waits for the GPU
            t_train += time.perf_counter() - t0
            tps = (step - last_eval) * s.batch * s.seq_len / (time.perf_counter() - t0)
            if not math.isfinite(ce):
                diverged = True
                hist.stopped = (f"training loss became {ce} in steps {last_eval + 1}-{step}: the run "
                                f"stopped there (learning rate {s.lr:g} too high?)")
                break
            with torch.no_grad(), autocast:
                m = eval_metrics(model, val)
            hist.record(step, ce, aux, tps, m)
            last_eval = step
            if on_eval:
                on_eval(hist)
            if deadline is not None and time.monotonic() > deadline and step < s.steps:
                hist.stopped = f"time limit: stopped at step {step} of {s.steps}"
                break
            t0 = time.perf_counter()
    hist.train_seconds = t_train
    if final_stats and not diverged and router in MOE_ROUTERS:
        with torch.no_grad(), autocast:
            hist.final = specialisation(model, val, corpus.strings)
    return hist


@dataclass
class TrainResult:
    """Every run of an experiment (router x seed) and what it ran on."""

    settings: TrainSettings
    runs: list[RunHistory] = field(default_factory=list)
    corpus: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document the page, the CLI's --json and committed results share."""
        runs = [r.as_dict() for r in self.runs]
        table = summary_table(runs)
        return {"settings": asdict(self.settings), "corpus": self.corpus,
                "environment": environment(),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "runs": runs, "summary": table.to_dict(orient="records"),
                "summary_text": summary_text(table, self.settings.steps,
                                             int(self.corpus.get("train_tokens", 0)))}


PROBE_STEPS = 2


def check_runs(s: TrainSettings, corpus: Corpus) -> None:
    """ValueError if the corpus cannot fill a batch, bf16 is asked off CUDA, or a run would not fit
    the device's memory (80% of a GPU's, the engine's budget on a CPU)."""
    check_fits(corpus, s.batch, s.seq_len)
    dev = resolve_device(s.device)
    if s.dtype == "bf16" and dev.type != "cuda":
        raise ValueError("dtype bf16 needs a CUDA device here; use float32 on cpu")
    limit = int(0.8 * torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" \
        else MAX_BYTES
    check_bytes("this training run", s.memory_bytes(corpus.vocab), limit)


def estimate_seconds(s: TrainSettings, corpus: Corpus) -> tuple[float, float]:
    """(seconds `train(s, corpus)` should take here, seconds of one step), from PROBE_STEPS steps
    of the first router timed now (the first step's allocations included, so it errs long). Every
    run is counted at that step's time, its evaluations (val batches of the training batch's size)
    and the closing statistics at a third of a step per batch, a forward against forward and
    backward. An estimate, not a bound: routers differ by about a third on a CPU (2026-12-03)."""
    check_runs(s, corpus)  # before the probe builds a model
    probe = replace(s, steps=PROBE_STEPS, eval_every=PROBE_STEPS, eval_batches=1, warmup=1)
    step_s = train_run(probe, corpus, s.routers[0], s.seeds[0], final_stats=False).train_seconds / PROBE_STEPS
    forwards = (math.ceil(s.steps / s.eval_every) + 2) * s.eval_batches
    return len(s.routers) * len(s.seeds) * step_s * (s.steps + forwards / 3), step_s


def train(s: TrainSettings, corpus: Corpus,
          progress: Callable[[float, str, list[RunHistory]], None] | None = None) -> TrainResult:
    """Train every router of `s` for every seed, in order; `progress(fraction, message, runs)`
    is called after every evaluation with the runs so far (the current one last)."""
    check_runs(s, corpus)
    result = TrainResult(s, corpus={"tokenizer": corpus.tokenizer, "vocab": corpus.vocab,
                                    "train_tokens": corpus.train.numel(),
                                    "val_tokens": corpus.val.numel(), "chars": corpus.chars,
                                    "text_sha256": corpus.text_sha})
    jobs = [(r, seed) for seed in s.seeds for r in s.routers]
    evals = math.ceil(s.steps / s.eval_every) + 1
    for i, (router, seed) in enumerate(jobs):
        def on_eval(h: RunHistory, i: int = i) -> None:
            if progress:
                frac = (i + len(h.step) / evals) / len(jobs)
                progress(min(frac, 1.0), f"{h.router} (seed {h.seed}): step {h.step[-1]}/{s.steps}, "
                         f"val loss {h.val_loss[-1]:.3f}", result.runs + [h])
        result.runs.append(train_run(s, corpus, router, seed, on_eval))
    if progress:
        progress(1.0, "done", result.runs)
    return result

