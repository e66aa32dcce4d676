"""CUDA C++ kernels, built on first use with torch's extension loader."""
