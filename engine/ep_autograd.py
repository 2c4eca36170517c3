"""The expert-parallel layer (engine.ep_layer) made differentiable, for training with experts on R ranks.

engine.ep_layer's dispatch and combine move rows only forward: its experts scale rows in place,
and nothing records a graph. Training needs each exchange's gradient, which is the other
exchange run on the gradients:

- dispatch: rows x[t] go to the pairs' experts. Its backward sends the gradients of the received
  rows back along the combine's routes and sums them per token: a combine with weights 1.
- combine: out[t] = sum_j w[t, j] y[t, j] after the expert outputs y come back. Its backward
  sends w[t, j] * grad_out[t] to the experts along the dispatch's routes (ExpertParallelLayer.resend),
  and grad_w[t, j] = <grad_out[t], y[t, j]> is computed where the token lives.

ExpertParallelExperts replaces the experts of one MoE layer of the training lab's model
(engine.train_model) with their contiguous block on this rank; routers, attention and everything
else are replicated and trained data-parallel (sync_gradients). Routers see their rank's tokens
only: an auxiliary loss or a capacity computed per batch is then per rank's batch. Every rank must
call the layers in the same order, as every collective requires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine.ep_layer import ExpertParallelLayer
from engine.ep_placement import contiguous_placement
from engine.ep_sections import Dispatched
from engine.moe_dispatch import grouped_ffn
from engine.validation import check_int


@dataclass
class _InFlight:
    """One layer call between its dispatch and its combine (and again in backward)."""

    d: Dispatched | None = None
    groups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def write(self, rows: torch.Tensor) -> None:
        """Copy rows (N, D), in received order, into the dispatch's buffers."""
        for (view, _), part in zip(self.groups, rows.split([v.shape[0] for v, _ in self.groups])):
            view.copy_(part)

    def read(self) -> torch.Tensor:
        """The dispatch's buffers, in received order, as one new (N, D) tensor."""
        return torch.cat([view for view, _ in self.groups])


class _Dispatch(torch.autograd.Function):
    """x (T, D) -> rows received by this rank's experts (N, D) and their expert ids (N,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: ExpertParallelLayer, experts: torch.Tensor,
                token_index: torch.Tensor, flight: _InFlight) -> tuple[torch.Tensor, torch.Tensor]:
        # Own buffers (no CUDA graph): backward reuses this call's layout after later calls.
        flight.d = layer.dispatch(x.detach(), experts, token_index, replay=False)
        flight.groups = [g for m in range(len(flight.d.rows)) for g in layer.received(flight.d, m)]
        ctx.layer, ctx.flight, ctx.k = layer, flight, experts.shape[1]
        ids = torch.cat([i for _, i in flight.groups])
        ctx.mark_non_differentiable(ids)
        return flight.read(), ids

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_ids: None) -> tuple:
        d = ctx.flight.d
        ctx.flight.write(grad_rows)
        ones = torch.ones(d.tokens, ctx.k, dtype=grad_rows.dtype, device=grad_rows.device)
        return ctx.layer.combine(d, ones), None, None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs y (N, D) in received order, gate weights (T, k) -> out (T, D)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, layer: ExpertParallelLayer,
                flight: _InFlight) -> torch.Tensor:
        d = flight.d
        flight.write(y.detach())
        out = layer.combine(d, weights.detach())
        # Every pair's returned row (zero for empty pairs), for the weights' gradient.
        returned = d.buf.index_select(0, d.position).view(d.tokens, d.k, -1)
        ctx.save_for_backward(returned, weights)
        ctx.layer, ctx.flight = layer, flight
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        returned, weights = ctx.saved_tensors
        d = ctx.flight.d
        grad_w = (returned.float() * grad_out.float()[:, None, :]).sum(-1).to(weights.dtype)
        per_pair = (weights.to(grad_out.dtype)[:, :, None] * grad_out[:, None, :]).flatten(0, 1)
        d.buf.index_copy_(0, d.position, per_pair)
        ctx.layer.resend(d)
        return ctx.flight.read(), grad_w, None, None


def expert_ffn(rows: torch.Tensor, ids: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
               first: int, ffn: str) -> torch.Tensor:
    """Rows (N, D) through their experts: expert `first + e` is w_in[e], w_out[e]; rows with
    another id (a main section's padding) give 0 and no gradient. Returns (N, D).

    The one-process model's grouped FFN with one slot per row and weight 1 (the combine applies
    the gate weights): torch._grouped_mm without a host sync where it runs (CUDA sm90, bf16),
    else its per-expert loop. A loop over the experts here, with a host sync, made the training
    step at one rank on an H200 2.7-3.3x slower (132-161 ms against 48-50 ms, 2026-12-03)."""
    if rows.shape[0] == 0:
        return torch.zeros_like(rows)
    local = ids - first
    mine = (local >= 0) & (local < w_in.shape[0])
    return grouped_ffn(rows, torch.where(mine, local, -1)[:, None], mine[:, None].to(rows.dtype),
                       w_in, w_out, ffn)


class PhaseClock:
    """Time spent per phase of a step, forward and backward: marks (see mark) record an event
    (CUDA, on the current stream, so nothing waits) or a clock reading (CPU) as the step runs
    through them; totals() reads them once the step is done."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, str, object]] = []  # (phase, "start" | "end", event or time)

    def record(self, phase: str, edge: str) -> None:
        """Note that `phase` starts or ends now."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        self.marks.append((phase, edge, event))

    def totals(self) -> dict[str, float]:
        """Milliseconds per phase since the last call (forward and backward together)."""
        if self.cuda:
            torch.cuda.synchronize()
        open_at: dict[str, object] = {}
        out: dict[str, float] = {}
        for phase, edge, event in self.marks:
            if edge == "start":
                open_at[phase] = event
                continue
            begun = open_at.pop(phase)
            ms = begun.elapsed_time(event) if self.cuda else (event - begun) * 1e3
            out[phase] = out.get(phase, 0.0) + ms
        self.marks = []
        return out


class _Mark(torch.autograd.Function):
    """Identity on a tensor that records a phase edge in forward and the mirrored edge in
    backward (where the phases run in reverse order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clock: PhaseClock, phase: str, edge: str) -> torch.Tensor:
        clock.record(phase, edge)
        ctx.clock, ctx.phase, ctx.edge = clock, phase, edge
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        ctx.clock.record(f"{ctx.phase}_backward", "end" if ctx.edge == "start" else "start")
        return grad, None, None, None


def mark(x: torch.Tensor, clock: PhaseClock | None, phase: str, edge: str) -> torch.Tensor:
    """x, with `phase`'s start or end recorded on `clock` in forward and backward (None: x)."""
    return x if clock is None else _Mark.apply(x, clock, phase, edge)


class ExpertParallelExperts(nn.Module):
    """Drop-in for engine.train_model.Experts over the default process group: forward(x (T, D),
    experts (T, k), weights (T, k)) -> (T, D) on every rank, the same call on every rank.

    From `experts` (w_in (E, D, F'), w_out (E, F, D), ffn) this rank keeps its contiguous block
    of the experts as its own parameters; the rows travel through engine.ep_layer. `clock`, if
    set, times dispatch, experts and combine (forward and backward).
    """

    def __init__(self, experts: nn.Module, rank: int, world: int, device: torch.device,
                 chunks: int = 1) -> None:
        super().__init__()
        num_experts = experts.w_in.shape[0]
        if not 1 <= world <= num_experts:
            raise ValueError(f"Ranks R must be between 1 and the experts E ({num_experts}) so "
                             f"every rank hosts an expert, got {world}")
        check_int("rank", rank, 0, world - 1)
        placement = contiguous_placement(num_experts, world)
        mine = placement.slots[rank]
        self.first, self.ffn = mine[0], experts.ffn
        self.w_in = nn.Parameter(experts.w_in.detach()[mine[0]:mine[-1] + 1].clone())
        self.w_out = nn.Parameter(experts.w_out.detach()[mine[0]:mine[-1] + 1].clone())
        # Gains are the engine layer's own experts; here they are never applied.
        self.layer = ExpertParallelLayer(placement, torch.ones(num_experts), rank, device, chunks,
                                         graphs=False)
        self.clock: PhaseClock | None = None

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        """x (T, D), experts/weights (T, k) (-1: empty slot) -> gate-weighted expert outputs."""
        if torch.is_autocast_enabled(x.device.type):
            # Rows travel in the autocast dtype (bf16), as a mixed-precision model's would.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        token_index = torch.arange(x.shape[0], device=x.device)  # no replicas: not read
        flight, c = _InFlight(), self.clock
        rows, ids = _Dispatch.apply(mark(x, c, "dispatch", "start"), self.layer, experts,
                                    token_index, flight)
        rows = mark(mark(rows, c, "dispatch", "end"), c, "experts", "start")
        y = mark(expert_ffn(rows, ids, self.w_in, self.w_out, self.first, self.ffn), c,
                 "experts", "end")
        out = _Combine.apply(mark(y, c, "combine", "start"), weights, self.layer, flight)
        return mark(out, c, "combine", "end")


def shard_experts(model: nn.Module, rank: int, world: int, device: torch.device
                  ) -> list[nn.Parameter]:
    """Swap the experts of every MoE layer of `model` (engine.train_model.MoELM, after it is on
    `device`) for ExpertParallelExperts over `world` ranks, in place; returns this rank's expert
    parameters, which sync_gradients leaves alone."""
    params: list[nn.Parameter] = []
    for layer in model.moe_layers():
        layer.experts = ExpertParallelExperts(layer.experts, rank, world, device)
        params += [layer.experts.w_in, layer.experts.w_out]
    return params


def sync_gradients(model: nn.Module, expert_params: list[nn.Parameter], world: int) -> None:
    """Data-parallel part of a step after backward of (local mean loss / R) on every rank: sum the
    replicated parameters' gradients over the ranks (one flat all_reduce). Expert gradients
    already hold every rank's contribution (the combine's backward brought them), so together
    both equal the gradient of the mean loss over all ranks' tokens."""
    if world == 1:
        return
    own = {id(p) for p in expert_params}
    grads = [p.grad for p in model.parameters() if id(p) not in own and p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
