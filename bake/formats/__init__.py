"""Export formats: the all-or-nothing export folder, HF (streamed shards), ONNX and GGUF, each with its own checks."""
