"""Expert-parallel dispatch against a plain all_to_all_single of the same bytes, one run, NCCL on GPUs.

Run under torchrun, one process per GPU (gloo on CPU works too, for a dry run):

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/bench_ep_nccl.py --d-model 4096 --dtype bf16 \
        --tokens 8192,16384,32768,65536 --out benchmarks/results

Times, in one run and per (tokens, chunks), the dispatch (counts + their exchange + rows placed
by slot + rows to their experts), the combine (rows back + weighted sum per token) and the whole
layer, each next to a plain all_to_all_single of the rows that cross ranks (the layer's split
sizes with the own rank's set to 0; one way, one way back, both ways). Prints per-rank times and bytes/s and, on the slowest rank, ratio = plain time /
phase time for each (the issue's target: dispatch_ratio >= 0.7); writes ep_<backend>_<N>ranks.json
and .md into --out with device, date and library versions. All the work is engine.ep_dispatch.worker.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ep_dispatch import worker  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) stays off, as on every run committed here
    worker()
