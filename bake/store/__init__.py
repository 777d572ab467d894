"""Tensor stores: safetensors shards, folder and module stores, the bounded-memory loader, raw memory and
sliced products."""
