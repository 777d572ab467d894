"""Architecture data: which tensors each fold touches, per LLM architecture and per diffusers component
(archs/ JSON)."""
