"""Loading checkpoints (HF safetensors directories, GGUF files) and tokenizers."""
