"""Attention math. ``reference`` is the spec; ``dispatch`` picks Triton kernels on CUDA."""
