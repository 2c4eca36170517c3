"""A call's CUDA work replayed from a CUDA graph once the call repeats.

The expert-parallel dispatch is bound by the host at small token counts: its two dozen launches,
two all_to_all_single calls among them, cost more host time than the transfer takes on the GPU.
One graph replay launches them all. A graph fixes every address and size it captured, so it
serves only calls with the same key, which the caller makes of its inputs' addresses, shapes and
strides and every size the work depends on; a replay reads whatever those addresses hold then.

A key is captured on its second call: the first runs as is, as a key seen once may never come
back and a capture costs milliseconds (and a warm-up call before a capture is what CUDA graphs
need anyway). The outputs of a replay are the graph's own tensors, which its next replay
overwrites.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

Out = TypeVar("Out")

GRAPH_LIMIT = 8  # graphs kept per CapturedCalls, each with its own buffers


class CapturedCalls(Generic[Out]):
    """CUDA graphs of one kind of call per key, at most `limit` kept (least recently used go)."""

    def __init__(self, limit: int = GRAPH_LIMIT) -> None:
        self.limit = limit
        _LIVE.add(self)
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, Out]] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self.replays = 0

    def __call__(self, key: Hashable, work: Callable[[bool], Out]) -> Out:
        """The call's outputs: from a replay of key's graph (captured now on key's second call),
        or from running work as is on its first.

        work(capturing) queues the call's work on the current stream and returns its outputs;
        with capturing True it runs inside a capture and must join every stream it forks.
        """
        if key in self._graphs:
            self._graphs.move_to_end(key)
            graph, out = self._graphs[key]
        elif key not in self._seen:
            self._remember(self._seen, key, None)
            return work(False)
        else:
            del self._seen[key]
            graph = torch.cuda.CUDAGraph()
            # thread_local: NCCL's watchdog thread queries events while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = work(True)
            self._remember(self._graphs, key, (graph, out))
        graph.replay()
        self.replays += 1
        return out

    def _remember(self, cache: OrderedDict, key: Hashable, value: object) -> None:
        cache[key] = value
        if len(cache) > self.limit:
            cache.popitem(last=False)

    def clear(self) -> None:
        """Drop every graph."""
        self._graphs.clear()
        self._seen.clear()


_LIVE: weakref.WeakSet[CapturedCalls] = weakref.WeakSet()


def release_all() -> None:
    """Drop the graphs of every CapturedCalls alive, as before destroying a process group whose
    communicator they captured (a probe on 2x H100 that destroyed it with such a graph alive
    hung at the end)."""
    for calls in list(_LIVE):
        calls.clear()
