"""The diffusers-pipeline family: bake, check, card and ONNX export of a pipeline folder (model_index.json)."""
