"""The hooked model's outputs on the probes: what every candidate (baked model, reloaded export,
ONNX graph, GGUF file) is compared with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bake.verify.noise_floor import NoiseFloor
from bake.verify.probes import Probe

IMAGE_PROBE_NAME = "image-text"


@dataclass
class ImageReference:
    """The hooked model's logits on a vision-language model's image+text probe (:mod:`bake.verify.image_probe`),
    and how far the maps move them."""

    inputs: dict[str, torch.Tensor]  # the processor's output, cpu
    logits: torch.Tensor  # [1, L, V] float32 cpu, hooked
    hooked_vs_base_max_rel: float  # max |hooked - base| / max |hooked| over every position
    hooked_vs_base_top1: float  # share of positions whose argmax the maps leave unchanged
    details: dict = field(default_factory=dict)  # what was built: image size, text, token count

    @property
    def probe(self) -> Probe:
        ids = self.inputs["input_ids"]
        mask = self.inputs.get("attention_mask")
        return Probe(IMAGE_PROBE_NAME, "image", ids, torch.ones_like(ids) if mask is None else mask)


@dataclass
class Reference:
    probes: list[Probe]
    logits: list[torch.Tensor]  # per probe, [B, L, V] fp32 cpu
    greedy_prompts: torch.Tensor  # [P, L]
    greedy: list[list[int]]
    n_tokens: int
    watch: list[str]
    activations: dict[str, torch.Tensor]  # diagnostic probe, execution order
    diag_probe: str
    noise_floor: NoiseFloor | None = None  # see bake.verify.noise_floor; None: not measured
    image: ImageReference | None = None  # a vision-language model's image+text probe (bake.verify.image_probe)
    notes: list[str] = field(default_factory=list)  # what was not verified, and why (the report's warnings)
