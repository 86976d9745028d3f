"""Weights from files: pretrained packages (safetensors, GGUF), the conversion cache and manifests."""
