"""Triton kernels, one module per op; each module holds its kernels and their launcher."""
