"""Atom quantization in numpy: number formats and kernel layouts (`formats`) and GPTQ (`gptq`)."""
