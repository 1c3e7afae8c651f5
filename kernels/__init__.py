"""Triton kernels of gsq, each beside its plain-torch reference; installed as `gsq.kernels`."""
