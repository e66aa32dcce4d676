"""compress_kernels: dequant-matmul kernels for compress's 4-bit and integer formats.

``reference`` holds the pure-torch oracle; ``dispatch`` picks the best available implementation for a
device, dtype and shape. Optional backends (Triton, CUDA extensions) are imported only when used.
"""
