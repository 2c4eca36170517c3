"""EP bandwidth sweep on GPUs (NCCL): plain all-to-all, NCCL's even all-to-all, dispatch, combine.

Run under torchrun, one process per GPU (gloo on CPU works too, for a dry run at small sizes):

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        benchmarks/bench_ep_sweep.py --decode --out benchmarks/results

Per payload size (1 to 256 MB per rank by default) the slowest rank's time, algorithm and bus
bandwidth of each, the dispatch's and combine's ratio to the plain exchange, and with --decode
the decoding case (128 tokens per rank) beside DeepEP's and pplx-kernels' published latencies.
Writes ep_sweep_<backend>_<N>ranks.json into --out. All the work is engine.ep_sweep.worker.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ep_sweep import worker  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    worker()
