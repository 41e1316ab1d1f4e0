"""Triton kernels of the compiled engine (CUDA; CI runs them in Triton's interpreter and compiles them for sm_90)."""
