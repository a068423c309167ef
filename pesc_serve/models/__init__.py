"""Model family (Llama, Mistral, Qwen2 bases with PESC layers) and checkpoint loading."""
