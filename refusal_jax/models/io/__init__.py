"""Model files: HF checkpoints, GGUF, the HF weight mapping, LoRA adapters, tokenizers."""
