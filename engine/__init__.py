"""ScaleLab's computation layer: routers, attention, scaling fits, cost models.

Importable without Streamlit or plotly; every page and the CLI (`python -m engine`) call into it.
Submodules are imported on demand so `import engine` stays cheap.
"""

__version__ = "0.1.0"
