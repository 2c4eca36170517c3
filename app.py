"""ScaleLab entry point: page config, navigation over the labs, and the environment badge."""

from pathlib import Path

import streamlit as st

from app_pages._ui import configure_torch, environment_badge, link_notice, warm_up

# A bundled icon: a ":material/...:" page icon makes every viewer's browser fetch it from a font host.
st.set_page_config(page_title="ScaleLab", page_icon=str(Path(__file__).parent / "app_pages" / "icon.png"),
                   layout="wide")
configure_torch()
warm_up()

# One page per line (icons are from the font Streamlit bundles, drawn without a request).
PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/routing.py", title="MoE routing lab", icon=":material/alt_route:", url_path="routing"),
    st.Page("app_pages/expert_parallel.py", title="Expert parallelism", icon=":material/hub:", url_path="expert-parallel"),
    st.Page("app_pages/attention.py", title="Attention kernels", icon=":material/bolt:", url_path="attention"),
    st.Page("app_pages/scaling.py", title="Scaling breakpoints", icon=":material/show_chart:", url_path="scaling"),
    st.Page("app_pages/cost.py", title="MoE vs dense cost", icon=":material/calculate:", url_path="cost"),
    st.Page("app_pages/training.py", title="MoE training lab", icon=":material/model_training:", url_path="training"),
]

page = st.navigation(PAGES)
environment_badge()
with link_notice(page.url_path):
    page.run()
