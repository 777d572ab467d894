"""A norm's consumers that are no ``nn.Linear``: a MoE router's weight and bias, fused 3-D expert tensors.

The registry names them by tensor (``tensor_consumers`` of a norm, :class:`bake.registry.llm.TensorConsumer`);
a shift ``t`` on the norm's output folds into each one's bias, ``b' = b + W t`` (for fused experts, per expert:
:func:`bake.core.fold_math.fold_experts_input_shift`).  The expert and router *weights* are only read, never
rewritten.  Where a named bias is not in the model (transformers gives Mixtral's, Qwen-MoE's, OLMoE's routers
and experts none), the shift cannot fold there and the planner keeps it in an affine module, naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from bake.core.plan_types import FoldOp, FoldStep, Layout
from bake.plan.sites import NOTHING, Needs
from bake.registry.llm import TensorConsumer, expand


def expand_consumers(consumers: Iterable[TensorConsumer], layer: str | None) -> tuple[TensorConsumer, ...]:
    """The entry's templates with ``{layer}`` filled in."""
    return tuple(TensorConsumer(weight=expand(c.weight, layer), bias=expand(c.bias, layer), layout=c.layout)
                 for c in consumers)


def _bias_shape(weight: torch.Tensor, layout: Layout) -> tuple[int, ...] | None:
    """The bias shape ``layout`` gives ``weight`` (None: the weight's rank does not fit the layout)."""
    if layout is Layout.LINEAR:
        return (weight.shape[0],) if weight.dim() == 2 else None
    if weight.dim() != 3:
        return None
    return (weight.shape[0], weight.shape[2] if layout is Layout.EXPERTS_IN_OUT else weight.shape[1])


def tensor_consumer_route(consumers: Iterable[TensorConsumer], params: Mapping[str, torch.Tensor],
                          write_access: Callable[[Iterable[str]], tuple[str | None, Needs]]
                          ) -> tuple[str | None, tuple[FoldStep, ...], Needs]:
    """(why not | None, steps, needs) for moving a shift into the biases of ``consumers`` (expanded names);
    ``params``: the model's parameters by name (shapes only: a skeleton on the meta device will do)."""
    steps, needs = [], NOTHING
    for c in consumers:
        weight = params.get(c.weight)
        if weight is None:
            return f"registry consumer tensor {c.weight} is not in the model", (), NOTHING
        want = _bias_shape(weight, c.layout)
        if want is None:
            mismatch = (f"registry lists {c.weight} as {c.layout.value}, the model's tensor has shape "
                        f"{tuple(weight.shape)}")
            return f"consumer {mismatch}", (), Needs(notes=(mismatch + ": shift not folded into it",))
        bias = params.get(c.bias)
        if bias is None:
            return f"consumer {c.module} has no {c.bias.rpartition('.')[2]} to take W t", (), NOTHING
        if tuple(bias.shape) != want:
            return f"consumer bias {c.bias} has shape {tuple(bias.shape)}, not {want}", (), NOTHING
        why, untie = write_access([c.bias])
        if why is not None:
            return f"consumer {why}", (), NOTHING
        steps.append(FoldStep(op=FoldOp.TENSOR_INPUT_SHIFT, module=c.module, layout=c.layout, tensors=(c.bias,),
                              reads=(c.weight,)))
        needs = needs + untie
    return None, tuple(steps), needs
