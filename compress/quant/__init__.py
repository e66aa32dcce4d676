"""Quantization: primitives, packing, methods, the GPTQ checkpoint format, runtime modules and loading."""
