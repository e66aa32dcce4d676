"""compress_kernels: dequant-matmul kernels for compress's 4-bit and integer formats.

``reference`` holds the pure-torch oracle; ``dispatch`` picks the best available implementation for a
device, dtype and shape (``cuda``: one-row int4 GEMV in CUDA C++; ``triton``: fused dequant-matmul for
the GPTQ layout and NF4; ``cpu_int4``: a C++ CPU kernel; ``reference``). Optional backends (Triton,
the C++ extensions) are imported or built only when used. ``bench`` measures them.
"""
