"""The training lab's model (engine.train_model.MoELM) trained with its experts over R ranks.

Every rank builds the same model (same seed), keeps its block of every MoE layer's experts
(engine.ep_autograd.shard_experts) and trains everything else data-parallel. Under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.ep_training \
        --mode check --steps 3 --out DIR       # gloo on CPU: same losses and gradients as one process
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m engine.ep_training \
        $BENCH_ARGS --out DIR                  # NCCL: tokens/s against one GPU, phases

check: every rank also trains the single-process model on the global batch (all ranks' sequences)
and compares, step by step, the loss and every gradient (its experts' slice for expert weights).
bench: tokens/s of the expert-parallel step against the same model on one GPU with the same
per-GPU batch (each rank runs it alone first), and where the step's time goes: dispatch, experts
and combine (forward and backward, CUDA events), attention (timed alone at the step's shapes).

Tokens are seeded random ids: the check and the timing do not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from engine.ep_autograd import PhaseClock, shard_experts, sync_gradients
from engine.ep_launch import add_job_arguments, committed, in_group, init_group, torchrun
from engine.ep_report import environment
from engine.flash_attention3 import attention
from engine.timing import time_fn
from engine.train_model import ModelConfig, MoELM, lm_loss
from engine.validation import check_choice, check_float, check_int

# The GPU run's model: 32 experts of width 2048 in 4 layers (0.55 B parameters, 16 bytes each
# with AdamW: 9 GB on the one-GPU run), 8 sequences of 1024 tokens per GPU.
BENCH_ARGS = ("--mode bench --dtype bf16 --d-model 1024 --d-expert 2048 --experts 32 --top-k 2 "
              "--layers 4 --heads 16 --vocab 8192 --seq-len 1024 --batch 8")


def build_parser() -> argparse.ArgumentParser:
    """Model shape, batch, steps and the job's settings."""
    p = argparse.ArgumentParser(description="expert-parallel training worker (run under torchrun)")
    p.add_argument("--mode", default="check", choices=["check", "bench"])
    p.add_argument("--router", default="topk",
                   help="router of the MoE layers; check: a comma list runs each in turn")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.0,
                   help="load-balancing loss weight; each rank's uses its own batch's loads")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--d-expert", type=int, default=48)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--steps", type=int, default=3, help="check: optimizer steps compared")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (check)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bench on CUDA: bf16 autocast")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    add_job_arguments(p, 60.0, "directory for ep_train_<mode>_<N>ranks.json")
    return p


def model_config(args: argparse.Namespace, router: str | None = None) -> ModelConfig:
    """The model of the job (checked by ModelConfig), with `router` or the first of --router."""
    return ModelConfig(vocab=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, seq_len=args.seq_len, d_expert=args.d_expert,
                       num_experts=args.experts, top_k=args.top_k,
                       router=router or args.router.split(",")[0], alpha=args.alpha,
                       seed=args.seed)


def global_batch(cfg: ModelConfig, world: int, batch: int, step: int) -> torch.Tensor:
    """Token ids (world * batch, S) of one step; rank r trains rows r * batch .. (r + 1) * batch."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    return torch.randint(cfg.vocab, (world * batch, cfg.seq_len), generator=gen)


def step_loss(model: MoELM, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """Next-token loss plus alpha times the summed load-balancing loss."""
    logits, aux = model(ids)
    return lm_loss(logits, ids) + alpha * aux


def check(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """Train the expert-parallel model and the single-process one side by side, for every
    router of --router; this rank's largest differences of loss and gradients per step."""
    return {"rows": [row for router in args.router.split(",")
                     for row in check_router(args, router, rank, world, device)]}


def check_router(args: argparse.Namespace, router: str, rank: int, world: int,
                 device: torch.device) -> list[dict]:
    """check() for one router."""
    cfg = model_config(args, router)
    ref, model = MoELM(cfg).to(device), MoELM(cfg).to(device)
    experts = shard_experts(model, rank, world, device)
    ref_names = dict(ref.named_parameters())
    slices = {id(ep.w_in): ep.first for ep in (m.experts for m in model.moe_layers())} | \
        {id(ep.w_out): ep.first for ep in (m.experts for m in model.moe_layers())}
    opt_ref = torch.optim.SGD(ref.parameters(), lr=args.lr)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    rows = []
    for step in range(args.steps):
        ids = global_batch(cfg, world, args.batch, step).to(device)
        opt_ref.zero_grad()
        ref_loss = step_loss(ref, ids, args.alpha)
        ref_loss.backward()
        opt.zero_grad()
        loss = step_loss(model, ids[rank * args.batch:(rank + 1) * args.batch], args.alpha)
        (loss / world).backward()  # every rank's share of the mean over the global batch
        sync_gradients(model, experts, world)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grad_err = grad_scale = 0.0
        for name, p in model.named_parameters():
            # Expert weights of the reference: this rank's block of them. Names agree up to the
            # experts module, which kept the attribute names w_in and w_out.
            want = ref_names[name].grad
            if id(p) in slices:
                want = want[slices[id(p)]:slices[id(p)] + p.shape[0]]
            grad_err = max(grad_err, float((p.grad - want).abs().max()))
            grad_scale = max(grad_scale, float(want.abs().max()))
        rows.append({"router": router, "rank": rank, "step": step, "loss": float(mean_loss) / world,
                     "ref_loss": float(ref_loss), "grad_max_abs_err": grad_err,
                     "grad_max_abs": grad_scale})
        opt_ref.step()
        opt.step()
    return rows


def attention_ms(cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype,
                 warmup: int, reps: int) -> float:
    """Milliseconds of every layer's causal attention, forward and backward, timed alone at the
    step's shapes (B, S, H, D / H)."""
    shape = (batch, cfg.seq_len, cfg.n_heads, cfg.d_model // cfg.n_heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def call() -> None:
        attention(q, k, v, causal=True, layout="bshd").backward(grad)

    return cfg.n_layers * time_fn(call, device, warmup, reps).median_ms


def bench(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """This rank's step times: the model alone on this device, then expert-parallel with phases."""
    cfg = model_config(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    ids = global_batch(cfg, world, args.batch, 0)[rank * args.batch:(rank + 1) * args.batch]
    ids = ids.to(device)

    def stepper(model: MoELM, experts: list | None) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=False)
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                loss = step_loss(model, ids, args.alpha)
            (loss / world).backward()
            if experts is not None:
                sync_gradients(model, experts, world)
            opt.step()
        return step

    alone = MoELM(cfg).to(device)
    dist.barrier()
    single_ms = time_fn(stepper(alone, None), device, args.warmup, args.reps).median_ms
    del alone
    model = MoELM(cfg).to(device)
    experts = shard_experts(model, rank, world, device)
    step = stepper(model, experts)
    dist.barrier()
    ep_ms = time_fn(step, device, args.warmup, args.reps).median_ms
    # Phases over further steps, so that the step's time above carries no marks.
    clock = PhaseClock(device)
    for layer in model.moe_layers():
        layer.experts.clock = clock
    for _ in range(args.reps):
        step()
    phases = {f"{k}_ms": v / args.reps for k, v in clock.totals().items()}
    tokens = args.batch * cfg.seq_len
    return {"rank": rank, "one_device_step_ms": single_ms, "ep_step_ms": ep_ms,
            "one_device_tokens_per_s": tokens / single_ms * 1e3,
            "attention_ms": attention_ms(cfg, args.batch, device, dtype, args.warmup, args.reps),
            **phases}


def worker(argv: list[str] | None = None) -> None:
    """Entry point of every torchrun process; rank 0 prints and writes the job's JSON."""
    args = build_parser().parse_args(argv)
    rank, world, device = init_group(args.backend, args.timeout, args.fail_rank)
    with in_group():
        for router in args.router.split(","):
            # Routers whose choice depends on the whole batch (capacity) route each rank's
            # batch apart, unlike one process: they train, but not as the same model.
            check_choice("--router", router, ("topk", "hash", "deepseek"))
        check_int("steps", args.steps, 1, 1000)
        check_int("batch", args.batch, 1, 4096)
        check_float("lr", args.lr, 0.0, 10.0, lo_open=True)
        cfg = model_config(args)
        if world > cfg.num_experts:
            raise ValueError(f"Ranks R ({world}) must be <= the experts E ({cfg.num_experts}) so "
                             "every rank hosts an expert")
        row = (check if args.mode == "check" else bench)(args, rank, world, device)
        rows: list[dict] = [{}] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            doc = {"mode": args.mode, "world": world, "backend": dist.get_backend(),
                   **environment(device), "model": asdict(cfg), "batch_per_rank": args.batch,
                   "dtype": args.dtype, "per_rank": rows, **summarize(args.mode, rows, world, cfg,
                                                                      args.batch)}
            print(json.dumps(doc, indent=1), flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"ep_train_{args.mode}_{world}ranks.json").write_text(
                    json.dumps(doc, indent=2))


def summarize(mode: str, rows: list[dict], world: int, cfg: ModelConfig, batch: int) -> dict:
    """check: the largest differences over ranks and steps; bench: tokens/s of both runs (the
    slowest rank's step) and the phases of the slowest rank's step."""
    if mode == "check":
        flat = [r for rank_rows in rows for r in rank_rows["rows"]]
        return {"max_loss_abs_err": max(abs(r["loss"] - r["ref_loss"]) for r in flat),
                "max_grad_abs_err": max(r["grad_max_abs_err"] for r in flat),
                "max_grad_abs": max(r["grad_max_abs"] for r in flat)}
    slow = max(rows, key=lambda r: r["ep_step_ms"])
    tokens = world * batch * cfg.seq_len
    single = max(r["one_device_step_ms"] for r in rows)
    return {"ep_tokens_per_s": tokens / slow["ep_step_ms"] * 1e3,
            "one_device_tokens_per_s": batch * cfg.seq_len / single * 1e3,
            "speedup_vs_one_device": single / slow["ep_step_ms"] * world,
            "slowest_rank_phases_ms": {k: v for k, v in slow.items() if k.endswith("_ms")}}


def launch_check(processes: int = 2, steps: int = 3, timeout_s: float = 120.0,
                 extra: list[str] | None = None) -> dict:
    """Run --mode check on `processes` local gloo processes; returns rank 0's JSON."""
    with tempfile.TemporaryDirectory(prefix="ep_train_") as tmp:
        torchrun("engine.ep_training", ["--mode", "check", "--steps", str(steps), "--backend",
                                        "gloo", "--timeout", str(max(5.0, timeout_s / 3)),
                                        "--out", tmp] + (extra or []),
                 processes, timeout_s, "expert-parallel training check")
        return json.loads((Path(tmp) / f"ep_train_check_{processes}ranks.json").read_text())


def committed_training() -> list[dict]:
    """Every committed result (ep_train_bench_*.json), newest first."""
    return committed("ep_train_bench_*.json")

if __name__ == "__main__":
    worker()
