"""Training with experts on several GPUs: tokens/s against the same model on one GPU, and where
the step's time goes (attention, experts, dispatch, combine), NCCL.

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        benchmarks/bench_ep_train.py --mode bench --dtype bf16 --d-model 1024 --d-expert 2048 \
        --experts 32 --top-k 2 --layers 4 --heads 16 --vocab 8192 --seq-len 1024 --batch 8 \
        --out benchmarks/results

(engine.ep_training.BENCH_ARGS holds these settings.)

Every rank first times the whole model alone on its GPU with its batch, then the expert-parallel
model (experts split over the ranks, the rest data-parallel). --mode check compares losses and
gradients with the single-process model instead. Writes ep_train_<mode>_<N>ranks.json into
--out. All the work is engine.ep_training.worker.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ep_training import worker  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    worker()
