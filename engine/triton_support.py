"""Triton where it is installed (the CUDA image), else None: the CPU install has none, and every
kernel module here (ep_combine, ep_place, lsh_triton) then falls back to torch."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
