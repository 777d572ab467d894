"""The hooked model's outputs on the probes: what every candidate (baked model, reloaded export,
ONNX graph, GGUF file) is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bake.verify.noise_floor import NoiseFloor
from bake.verify.probes import Probe


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
