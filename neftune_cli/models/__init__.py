"""Models: loading (dtype, attention, RoPE, LoRA, 4-bit), quantization, the tokenizer files a run writes."""
