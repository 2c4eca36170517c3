"""One training step of the lab's model, run as is or replayed from a CUDA graph.

A step: forward (bf16 autocast on a GPU if asked), next-token loss + alpha x the routers' aux
loss, backward, gradients clipped at norm 1, AdamW (betas 0.9, 0.95, weight decay 0.1) with
linear warm-up then cosine decay to 10% of the peak rate, then DeepSeek's bias update. Nothing
in it reads a value back to the host: losses are summed on the device and read by `take_means`
at evaluations, so the host queues steps ahead of the GPU.

On CUDA the optimiser is fused AdamW. With graphs=True the first WARMUP steps run as is (on a side
stream, as CUDA graphs require), the next one is captured and every later step replays it: one
launch per step instead of a thousand, the same arithmetic. A dense and an MoE model get the same
treatment, so their step times stay comparable.
"""

from __future__ import annotations

import math

import torch

from engine.train_model import MoELM, lm_loss

WARMUP = 3  # steps run as is before a capture


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Learning-rate multiplier at 0-based step `step`: linear warm-up over `warmup` steps, then
    cosine from 1 towards 0.1, which it reaches at step `steps` (one past the last step run)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


class TrainStep:
    """Steps of one model: `step(i, ids)` trains on ids (B, S) at 1-based step i."""

    def __init__(self, model: MoELM, lr: float, warmup: int, steps: int, bf16: bool,
                 graphs: bool = False) -> None:
        dev = next(model.parameters()).device
        self.model, self.cuda = model, dev.type == "cuda"
        self.peak, self.warmup, self.steps = lr, warmup, steps
        self.params = list(model.parameters())
        # A device tensor learning rate lets a captured step read each step's rate.
        self.opt = torch.optim.AdamW(self.params, lr=torch.tensor(lr, device=dev) if self.cuda else lr,
                                     betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=True if self.cuda else None, capturable=self.cuda)
        # Autocast's weight-cast cache must be off under CUDA graphs (torch's CUDA graphs notes).
        self.autocast = torch.autocast(dev.type, torch.bfloat16, enabled=bf16,
                                       cache_enabled=not graphs)
        self.graphs = graphs and self.cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_ids: torch.Tensor | None = None
        self.side = torch.cuda.Stream(dev) if self.graphs else None
        self.sums = torch.zeros(2, device=dev)  # training loss, aux loss since take_means
        self.count = self.calls = 0

    def _set_lr(self, step: int) -> None:
        lr = self.peak * lr_factor(step - 1, self.warmup, self.steps)
        if self.cuda:
            self.opt.param_groups[0]["lr"].fill_(lr)
        else:
            self.opt.param_groups[0]["lr"] = lr

    def _work(self, ids: torch.Tensor) -> None:
        with self.autocast:
            logits, aux = self.model(ids)
            ce = lm_loss(logits, ids)
        (ce + self.model.cfg.alpha * aux).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        for r in self.model.routers():
            r.update_bias()
        self.sums += torch.stack([ce.detach().float(), aux.detach()])

    def step(self, step: int, ids: torch.Tensor) -> None:
        """Train on ids (B, S) (on the model's device) as 1-based step `step`."""
        self._set_lr(step)
        self.count += 1
        self.calls += 1
        if self.graph is not None:
            self.static_ids.copy_(ids)
            self.graph.replay()
        elif not self.graphs:
            self.opt.zero_grad(set_to_none=True)
            self._work(ids)
        elif self.calls <= WARMUP:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.opt.zero_grad(set_to_none=True)
                self._work(ids)
            torch.cuda.current_stream().wait_stream(self.side)
        else:  # capture this step (capturing runs nothing), then replay it
            self.opt.zero_grad(set_to_none=True)  # backward in the graph then allocates them
            self.static_ids = ids.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._work(self.static_ids)
            self.graph.replay()

    def take_means(self) -> tuple[float, float]:
        """Mean training and aux loss over the steps since the last call (one host sync)."""
        ce, aux = (self.sums / max(1, self.count)).tolist()
        self.sums.zero_()
        self.count = 0
        return ce, aux
