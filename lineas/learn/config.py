"""LinEAS / Linear-AcT hyperparameters: the one place their defaults and checks live.

``lineas-train`` builds its flags' defaults from :class:`TrainConfig`, :func:`lineas.learn.train.learn_maps`
starts from it, and the demo passes only the fields it changes; every range check is in
``TrainConfig.__post_init__`` (a :class:`ConfigError` names the field, which the CLIs turn into
their flag).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass


class Method(str, enum.Enum):
    LINEAS = "lineas"          # all maps trained jointly by gradient descent on the W2 loss
    LINEAR_ACT = "linear-act"  # closed form, one site at a time in forward order


class Optimizer(str, enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


class Init(str, enum.Enum):
    """Where LinEAS starts: identity maps, or the closed-form Linear-AcT maps (see :func:`learn_maps`)."""

    IDENTITY = "identity"
    LINEAR_ACT = "linear-act"


class Foldable(str, enum.Enum):
    """Train only the parts of the maps that fold into standard weights (see :mod:`lineas.learn.parts`)?"""

    AUTO = "auto"  # on when a registry entry (bake/registry/archs) describes the model: the planner knows its folds
    ON = "on"      # also without a registry entry (planned by module type: conservative)
    OFF = "off"    # train every scale and shift; the bake may need affine modules (trust_remote_code)


class Schedule(str, enum.Enum):
    COSINE = "cosine"      # learning rate annealed to 0 over the run
    CONSTANT = "constant"


class ConfigError(ValueError):
    """A hyperparameter out of range; ``field`` names it so the CLIs can name their flag."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def for_flag(self) -> str:
        """The message with the field written as its command-line flag (``--batch-size ...``)."""
        return f"--{self.field.replace('_', '-')} {self.problem}"


_ENUMS = {"method": Method, "optimizer": Optimizer, "init": Init, "schedule": Schedule, "foldable": Foldable}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters, with THE defaults (``lineas-train``, :func:`learn_maps` and the demo read them
    from here); stored as JSON in the maps metadata.

    The optimiser defaults are measured (issue 8, `benchmarks/train_defaults.py`): Adam, lr 5e-3,
    torch's betas (0.9, 0.999), cosine schedule, batches of 32.  In 100 steps they cut the pooled W2
    of a tiny Llama (24+24 random prompts, both norms of both layers) by 63% (lr 1e-2: 66%, 2e-3:
    54%, 1e-3 -- apple/ml-lineas' lr -- 41%; betas (0.9, 0.9) changed it by under 2 points) and move
    SmolLM2-135M's sentiment (see README).  Plain SGD at lr 0.1, the old default, cut it by 24%:
    the loss is a mean over neurons, so every neuron's gradient is divided by the width.

    ``foldable`` defaults to ``auto`` because the product is a steered checkpoint that any standard
    runtime serves: on a model the registry knows, maps that need affine modules would force
    ``trust_remote_code`` (no llama.cpp, vLLM, TGI), so the learner trains only what folds and says
    what it froze; ``off`` is one flag away.  Where everything folds (Llama-style norms) it changes nothing.
    """

    method: Method = Method.LINEAS
    init: Init = Init.IDENTITY
    steps: int = 1000
    optimizer: Optimizer = Optimizer.ADAM
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    schedule: Schedule = Schedule.COSINE
    batch_size: int = 32
    max_length: int | None = 64
    sparsity_l1: float = 0.0
    sparsity_group: float = 0.0
    seed: int = 0
    holdout: float = 0.0
    foldable: Foldable = Foldable.AUTO
    # Serving runtimes (bake.registry.llm.Runtime values) the maps must fold for: a shift whose fold switches on a
    # bias flag one of them does not serve is frozen too (lineas-train --require-runtime; needs foldable and a
    # fold planner, see learn_maps).  Plain names here: the planner checks them.
    runtimes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in _ENUMS.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise ConfigError(name, f"must be one of {', '.join(k.value for k in kind)}, got {value!r}") from None
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError("max_length", f"must be >= 1, got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be > 0 and finite, got {self.lr}")
        for name in ("sparsity_l1", "sparsity_group"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(name, f"must be >= 0 and finite, got {v}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.holdout < 1:
            raise ConfigError("holdout", f"must be in [0, 1), got {self.holdout}")
        object.__setattr__(self, "runtimes", _runtime_names(self.runtimes))
        if self.runtimes and self.foldable is Foldable.OFF:
            raise ConfigError("require_runtime", f"{', '.join(self.runtimes)} asks for maps that fold for that "
                                                 "runtime, which --foldable off does not train")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=lambda v: v.value)


def _runtime_names(names) -> tuple[str, ...]:
    """Runtime names as plain strings, without repeats.  They are checked where they are planned (the fold
    planner; ``lineas-train`` spells them as the bake does first, ``llamacpp`` -> ``llama.cpp``)."""
    if isinstance(names, str):
        names = (names,)
    return tuple(dict.fromkeys(str(getattr(n, "value", n)) for n in names or ()))
