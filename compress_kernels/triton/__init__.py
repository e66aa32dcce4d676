"""Triton dequant-matmul kernels reading the packed 4-bit formats directly (imported only when used)."""
