"""Home: what ScaleLab is, a link to every lab, and the environment it runs in."""

import streamlit as st

from app_pages._ui import _environment

st.title("ScaleLab")
st.markdown(
    "Quick, trustworthy answers to large-model systems questions. Every figure comes from the "
    "`engine` package, and every page can be reproduced from a shell with `python -m engine`."
)

LABS = [
    ("app_pages/routing.py", "MoE routing lab",
     "How balanced is hash routing on Zipf tokens? Hash, top-k, Switch, GShard, Expert Choice and "
     "DeepSeek-V3 routers on the same generated tokens, with histograms and balance metrics."),
    ("app_pages/expert_parallel.py", "Expert parallelism",
     "Place experts on ranks: per-rank load, all-to-all traffic, and a real dispatch on torch.distributed."),
    ("app_pages/attention.py", "Attention kernels",
     "FlashAttention-4 and -3 against every SDPA backend and FlexAttention, forward and "
     "forward + backward, with training masks and a training-step view, in TFLOP/s."),
    ("app_pages/scaling.py", "Scaling breakpoints",
     "Is there really a knee in this scaling curve, and where? Exact broken power-law fits with "
     "confidence intervals, on bundled public data or your CSV."),
    ("app_pages/cost.py", "MoE vs dense cost",
     "Parameters and training FLOPs with and without MoE, will it fit (memory per GPU), time "
     "to train, checked against measured training steps."),
    ("app_pages/training.py", "MoE training lab",
     "Train a small MoE language model once per router on the same text and batches: validation "
     "loss, expert balance and what each expert learned."),
]
for path, title, blurb in LABS:
    with st.container(border=True):
        st.page_link(path, label=f"**{title}**")
        st.caption(blurb)

st.subheader("Environment")
st.table({k: [v] for k, v in _environment().items()})
