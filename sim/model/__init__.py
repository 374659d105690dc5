"""The functional model: NumPy transformer layers, weights and their readers (safetensors, GGUF),
tokenizers, sampling, quantization, the KV stores (contents) and the cacheless reference. It never
reads the clock."""
