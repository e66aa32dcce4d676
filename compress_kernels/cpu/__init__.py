"""CPU fast paths: torch's packed int4 matmul fed from the GPTQ layout, converted once at load."""
