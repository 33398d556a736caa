"""The method interface every training method implements, and the registry that names them.

A method is a small plug-in: a config dataclass and a class with four verbs. The training pipeline
(`diffprune.train.pipeline`) drives any method the same way:

    method = get_method("diff-pruning")(config, base_model, head_names)
    for phase in method.phases:                 # e.g. ("l0", "fixed_mask") or ("finetune",)
        spec = method.build_phase(phase)        # the module to train + optimizer groups + penalty
        ... Trainer trains spec.model ...
        method.end_phase(phase)                 # e.g. project δ onto the L0 ball
        save(method.export())                   # a resumable snapshot, also the final task diff

`restore(diff)` puts a method back into the state right after the phase that produced `diff`, which is
how `--resume` skips finished phases. Register a method by decorating its class with `@register`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from ..errors import DiffpruneError, unknown_name
from ..storage import TaskDiff


@dataclass
class ParamGroup:
    """One optimizer group: its parameters, learning rate, weight decay and schedule."""
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0
    schedule: str = "linear"  # "linear" (warmup then linear decay) or "constant"
    eps: float = 1e-8
    hold: float = 0.0  # share of the phase's first steps with learning rate 0 (the group waits, frozen)
    # whether the group's gradients count towards (and are scaled by) gradient-norm clipping. Diff Pruning's
    # α is left out: the penalty's gradient over millions of gates would dominate the norm, and clipping
    # would then shrink the task gradients of w and the head with it
    clip: bool = True
    # an extra learning-rate multiplier as a function of the share of the phase done, in [0, 1], applied on
    # top of `schedule` and `hold` (Diff Pruning raises w's rate as its gates close)
    scale: Callable[[float], float] | None = None


@dataclass
class PhaseSpec:
    """What the trainer needs for one phase of a method."""
    name: str
    model: nn.Module                       # forward(**batch) -> HF output with .loss and .logits
    groups: list[ParamGroup]
    epochs: float
    # added to the task loss (λ·E‖δ‖₀); called with the share of the phase's steps done so far, in [0, 1]
    penalty: Callable[[float], Tensor] | None = None
    stats: Callable[[], dict[str, float]] | None = None  # extra values logged with the loss
    # called once with the phase's number of optimizer steps, before its optimizer is built (a method may
    # size learning rates or schedules to the budget here)
    plan: Callable[[int], None] | None = None
    # called after every optimizer step with the share of the phase's steps done (before that step)
    after_step: Callable[[float], None] | None = None
    # state-dict prefixes that checkpoints keep besides the trainable parameters: buffers that change
    # from run to run, such as a fixed mask's positions (the frozen base weights are never saved)
    checkpoint_prefixes: tuple[str, ...] = ()


@dataclass
class MethodConfig:
    """Fields shared by every method. Subclasses add their own, each documented where declared."""
    lr: float = 5e-5            # learning rate of the trained pretrained-side parameters
    head_lr: float | None = None  # learning rate of the task head (None: same as lr)
    weight_decay: float = 0.0
    epochs: float = 3.0         # epochs of the (last) training phase

    def __post_init__(self):
        self.check_positive(lr=self.lr, epochs=self.epochs)
        if self.head_lr is not None:
            self.check_positive(head_lr=self.head_lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiffpruneError(f"unknown option(s) {unknown} for this method (known: {sorted(known)})")
        hints = typing.get_type_hints(cls)

        def check(get) -> None:
            for key in values:
                if key in hints and not _fits(get(key), hints[key]):
                    raise DiffpruneError(f"option {key} expects {_describe(hints[key])}, got {values[key]!r}")

        try:  # the config's own checks speak first (they also accept a few conveniences, e.g. "a,b" lists)
            config = cls(**values)
        except (TypeError, ValueError) as exc:  # a comparison with a value of the wrong type
            check(values.get)
            raise DiffpruneError(f"invalid option value ({exc})") from None
        check(lambda key: getattr(config, key))  # what passed them must still have the declared type
        return config

    def check_sparsity(self, sparsity: float) -> None:
        if not (0.0 < sparsity <= 1.0):
            raise DiffpruneError(f"--sparsity is the share of entries kept and must be in (0, 1], got "
                                 f"{sparsity} (0.005 keeps 0.5%)")

    def check_positive(self, **values: float) -> None:
        self.check_finite(**values)
        for key, value in values.items():
            if value is None or value <= 0:
                raise DiffpruneError(f"{key} must be > 0, got {value}")

    def check_finite(self, **values: float | None) -> None:
        """Numbers must be finite (None passes): NaN slips through every comparison."""
        for key, value in values.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise DiffpruneError(f"{key} must be a finite number, got {value!r}")


def _fits(value: Any, tp: Any) -> bool:
    """Whether an option value (from JSON or `--set`) has the declared type; floats must be finite."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1] if args else Any) for v in value.values())
    return True  # a type this check does not know: the config's own __post_init__ decides


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple):
        return f"a JSON list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return "a JSON object"
    return str(tp)


class Method(ABC):
    """A parameter-efficient (or full) training method; see the module docstring."""
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    phases: tuple[str, ...] = ("finetune",)
    # whether `fold` gives a plain transformers model that `from_pretrained` loads with the same outputs
    # (what `merge` writes); False where the additions are non-linear (adapters) or the result needs
    # diffprune's own loader (head-pruned models)
    foldable: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, model: nn.Module, head_names: list[str]):
        self.config = config
        self.model = model
        self.head_names = list(head_names)
        # Per phase, extra tensor files to write next to the phase's snapshot ({file name: tensors}); a
        # method fills it in `end_phase` (Diff Pruning's kept L0 state).
        self.saved_files: dict[str, dict[str, dict[str, Tensor]]] = {}
        # Per phase, extra numbers that the pipeline records in that phase's metrics.json under "train"
        # (e.g. the share of δ nonzero before the projection); filled in `end_phase` or `prepare`.
        self.phase_stats: dict[str, dict[str, float]] = {}

    def prepare(self, train_dataset, collate) -> None:
        """Called once with the tokenized training set (and its collator) before the first phase.

        For methods that look at task data before training, such as Prune-LoRA's head importance. Must be
        deterministic for a given seed: `--resume` calls it again and expects the same result.
        """

    @abstractmethod
    def build_phase(self, phase: str) -> PhaseSpec:
        """Prepare `phase` and say what to train."""

    def end_phase(self, phase: str) -> None:
        """Transition after `phase` (default: nothing)."""

    @abstractmethod
    def export(self) -> TaskDiff:
        """What is stored for the task now (its `base_model`/`task` fields are filled by the caller)."""

    @abstractmethod
    def restore(self, diff: TaskDiff) -> None:
        """Return to the state saved by `export()` (the snapshot of a finished phase)."""

    @classmethod
    def budget(cls, epochs: float) -> dict[str, float]:
        """Config options that spend `epochs` in total over the method's phases (for `compare`).

        Default: one phase gets them all; two-phase methods split them evenly.
        """
        return {"epochs": epochs}

    @classmethod
    def attach(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Give a freshly loaded base model the modules this method adds (adapters, LoRA layers).

        Called with the stored method config before a saved diff is applied, so that the stored tensors of
        added modules have somewhere to go; methods call it on their own model too, so training and
        reloading build the same structure. Must modify `model` in place (base parameter names unchanged)
        and return it. Default: the method adds nothing.
        """
        return model

    @classmethod
    def fold(cls, model: nn.Module) -> nn.Module:
        """Fold added modules into the base weights and return a plain transformers model (for `merge`).

        Default: nothing was added, so the model is already plain. Methods whose additions cannot be
        folded (bottleneck adapters are non-linear) raise a DiffpruneError that says so.
        """
        return model

    def eval_model(self) -> nn.Module:
        """The module to evaluate now (default: the model with the current task state applied)."""
        return self.model

    def head_group(self) -> ParamGroup:
        params = [self.model.get_parameter(n) for n in self.head_names]
        lr = self.config.head_lr or self.config.lr
        return ParamGroup("head", params, lr, self.config.weight_decay)

    def head_state(self) -> dict[str, Tensor]:
        return {n: self.model.get_parameter(n).detach().clone() for n in self.head_names}

    def load_head(self, dense: dict[str, Tensor]) -> None:
        for name, value in dense.items():
            if name in self.head_names:
                self.model.get_parameter(name).data.copy_(value)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    from . import _load_all  # noqa: F401  (imports every built-in method so that it registers)

    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]


def make_config(method: type[Method], values: dict[str, Any]) -> MethodConfig:
    return method.config_class.from_dict({k: v for k, v in values.items() if v is not None})
