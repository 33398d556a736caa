"""LoRA (Hu et al., 2021): a trainable low-rank bypass `W x + (α/r) B A x` beside frozen weight matrices.

The LoRA layers are PEFT's (`peft.inject_adapter_in_model`), injected *into* the transformers model in place,
so the model stays a transformers model that the Trainer and `apply_diff` handle like any other. PEFT wraps
each targeted layer, which renames its frozen weight: `...attention.self.query.weight` becomes
`...attention.self.query.base_layer.weight`, beside `...query.lora_A.default.weight` (r × in) and
`...query.lora_B.default.weight` (out × r). Training and reloading both go through `attach`, so the names
in a stored diff (and in its fingerprint) are the attached model's; `fold` merges B A into W with PEFT's own
`merge` and puts the plain layers back, so a merged checkpoint has the usual names.

One phase, `finetune`: the LoRA matrices (lr), the task head (head_lr) and, with `train_layernorm`, every
LayerNorm (Prune-LoRA trains them) train; everything else is frozen. The stored diff holds those tensors
densely; `config["fingerprint_base"]` lists every frozen base tensor, since the low-rank update is only
meaningful on the weights it was trained beside.

Defaults follow METHODS.md, the paper and its reference code: q, k, v and the attention output projection
of every attention block `diffprune.archs` finds (self- and cross-attention; GPT-2's and ModernBERT's fused
q|k|v projection counts as q, k and v), named in full, so any family with a discoverable layout works,
A Gaussian and B zero (so the model starts as the pretrained one), r 8, α 16, lr 5e-4. `rank_pattern` /
`alpha_pattern` give single layers another rank or α (PEFT's keys: a module-name suffix or regex, e.g.
``{"layer\\.3\\..*": 8}``); Prune-LoRA's rank-varied LoRA is exactly that.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method lora --lr 5e-4 --epochs 10 --output-dir runs/rte-lora
    diffprune merge runs/rte-lora --output runs/rte-lora-merged     # LoRA folded into W
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..archs import HOW_TO_OVERRIDE, describe, is_norm, task_head_names
from ..errors import DiffpruneError
from ..storage import TaskDiff
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register

INITS = {"gaussian": "gaussian", "kaiming": True}  # our name → PEFT's `init_lora_weights`
_LORA = "lora_"  # PEFT's prefix of every LoRA parameter/module (`LoraModel.prefix`)


@dataclass
class LoRAConfig(MethodConfig):
    # lr, rank, alpha and weight_decay are those of the reference code's RoBERTa-base GLUE scripts
    # (microsoft/LoRA examples/NLU: lr 5e-4, r 8, α 16, weight decay 0.1, warmup 0.06, 30-80 epochs)
    lr: float = 5e-4            # learning rate of the LoRA matrices (and of the LayerNorms if trained)
    weight_decay: float = 0.1   # on the LoRA matrices and the head; never on LayerNorms
    rank: int = 8               # r, the rank of B A (also the Prune-LoRA seed's high rank)
    alpha: float = 16.0         # α; the update is scaled by α / r
    dropout: float = 0.1        # dropout on the LoRA branch's input (PEFT `lora_dropout`; not in the papers)
    targets: list[str] | None = None  # module-name patterns to adapt (None: q, k, v, o of the architecture)
    rank_pattern: dict[str, int] = field(default_factory=dict)     # module pattern → its own rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module pattern → its own α
    train_layernorm: bool = False  # also train every LayerNorm (Prune-LoRA does)
    # A's init (B is always zero): "gaussian" as the paper and METHODS.md say (PEFT: std 1/r), or "kaiming"
    # (uniform, like nn.Linear's default), which is what the reference code actually does
    init: str = "gaussian"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.targets, str):  # `--set targets=query,value` arrives as one string
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) for t in self.targets)):
            raise DiffpruneError(f"targets must be a non-empty list of module-name patterns (or unset for the "
                                 f"architecture's q, k, v, o), got {self.targets!r}")
        _check_rank("rank", self.rank)
        self.check_positive(alpha=self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise DiffpruneError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise DiffpruneError(f"{name} must map module-name patterns to values, e.g. "
                                     f"{{\"layer.0.attention.self.query\": 4}}, got {pattern!r}")
        for key, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", r)
        for key, a in self.alpha_pattern.items():
            self.check_positive(**{f"alpha_pattern[{key!r}]": a})
        if self.init not in INITS:
            raise DiffpruneError(f"init must be one of {sorted(INITS)}, got {self.init!r}")


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DiffpruneError(f"{what} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------- PEFT glue

def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The explicit `targets`, or the full names of q, k, v, o of every attention block (`archs.describe`).

    PEFT matches a list entry against a module name that equals it or ends with "." + it, so full names
    adapt exactly those modules (never BERT's feed-forward `output.dense` or GPT-2's `mlp.c_proj`). Layers
    that head pruning emptied have no q/k/v left; their zero-width output projection is skipped.
    """
    if targets:
        return list(targets)
    try:
        arch = describe(model)
    except DiffpruneError as exc:
        raise DiffpruneError(f"lora: no default target modules ({exc}); or pass targets explicitly, e.g. "
                             "--set targets=query,value") from exc
    names = [n for a in arch.attentions() for n in a.projections]
    if not names:  # pragma: no cover - describe() refuses a model without attention
        raise DiffpruneError(f"lora: found no attention projections; {HOW_TO_OVERRIDE}")
    return names


def peft_config(model: nn.Module, config: LoRAConfig):
    """The `peft.LoraConfig` for `config` on `model`, and the names of the modules it will adapt."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, config.targets)
    probe = LoraConfig(target_modules=targets)
    matched = {name: m for name, m in model.named_modules()
               if name and check_target_module_exists(probe, name) is True}  # PEFT's own name matching
    if not matched:
        raise DiffpruneError(f"lora: targets {targets} match no module of the model")
    head_modules = {n.rpartition(".")[0] for n in task_head_names(model)}
    in_head = sorted(n for n in matched if n in head_modules)
    if in_head:  # the head trains densely and is stored whole; adapting it would also rename its weights
        raise DiffpruneError(f"lora: targets {targets} match task-head module(s) {', '.join(in_head)}; "
                             "make the patterns specific to the encoder (e.g. 'attention.output.dense')")
    for what, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:  # PEFT silently ignores a key that matches nothing: a typo would go unnoticed
            if not any(get_pattern_key([key], name) == key for name in matched):
                raise DiffpruneError(f"lora: {what} key {key!r} matches none of the adapted modules "
                                     f"(e.g. {next(iter(matched))})")
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern), bias="none",
        init_lora_weights=INITS[config.init],
        # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's; PEFT needs to know
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched.values()),
    )
    return lora, sorted(matched)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT tuner layers (LoRA-wrapped Linears/Conv1Ds) in `model`, by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def is_lora_param(name: str) -> bool:
    return any(part.startswith(_LORA) for part in name.split("."))


def layernorm_names(model: nn.Module, exclude: set[str]) -> list[str]:
    """Parameters of every LayerNorm / RMSNorm of `model` (BERT's `LayerNorm`, GPT-2's `ln_1`, Llama's
    `input_layernorm`, …; `archs.is_norm`) not in `exclude`."""
    names = []
    for mod_name, module in model.named_modules():
        if is_norm(module):
            names += [f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return [n for n in names if n not in exclude]


# --------------------------------------------------------------------------------------------- method

@register
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    phases = ("finetune",)

    def __init__(self, config: LoRAConfig, model: nn.Module, head_names: list[str]):
        super().__init__(config, model, head_names)
        self.attach(model, config.to_dict())
        params = dict(model.named_parameters())
        missing = [n for n in self.head_names if n not in params]
        if missing:
            raise DiffpruneError(f"lora: the task head parameter(s) {', '.join(missing)} were renamed by the "
                                 "LoRA injection; make the targets specific to the encoder")
        head = set(self.head_names)
        self.lora_names = [n for n in params if is_lora_param(n)]
        self.norm_names = layernorm_names(model, head) if config.train_layernorm else []
        trained = set(self.lora_names) | set(self.norm_names) | head
        self.base_names = sorted(n for n in params if n not in trained)  # frozen; covered by the fingerprint

    @classmethod
    def attach(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Inject the LoRA layers described by a stored config (no-op if the model already has them).

        Extra keys of a stored diff config (`fingerprint_base`, fields of a subclass's config) are ignored.
        """
        if lora_layers(model):
            return model
        from peft import inject_adapter_in_model

        known = {f.name for f in fields(cls.config_class)}
        cfg = cls.config_class.from_dict({k: v for k, v in config.items() if k in known})
        lora, _ = peft_config(model, cfg)
        try:
            inject_adapter_in_model(lora, model)  # in place; returns `model`
        except ValueError as exc:  # e.g. a target that is a whole block, not a Linear/Conv1D
            raise DiffpruneError(f"lora: PEFT cannot adapt these targets: {str(exc).splitlines()[0]}") from exc
        return model

    @classmethod
    def fold(cls, model: nn.Module) -> nn.Module:
        """Merge every LoRA update into its base weight (PEFT's `merge`) and put the plain layers back.

        This is what `LoraModel.merge_and_unload` does, for a model that was injected in place rather
        than wrapped: the result has the architecture's usual parameter names and no PEFT modules.
        """
        layers = lora_layers(model)
        with torch.no_grad():
            for layer in layers.values():
                layer.merge(safe_merge=True)  # W += (α/r) B A, transposed for Conv1D; raises on NaN/inf
            for name, layer in layers.items():
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
        if hasattr(model, "peft_config"):  # set by the injection; a plain model has none
            del model.peft_config
        return model

    def build_phase(self, phase: str) -> PhaseSpec:
        c = self.config
        trained = set(self.lora_names) | set(self.norm_names) | set(self.head_names)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in trained)
        get = self.model.get_parameter
        groups = [
            ParamGroup("lora", [get(n) for n in self.lora_names], c.lr, c.weight_decay),
            # no weight decay on LayerNorm gains and shifts (the usual BERT-finetuning convention)
            ParamGroup("layernorm", [get(n) for n in self.norm_names], c.lr, 0.0),
            self.head_group(),
        ]
        return PhaseSpec(phase, self.model, [g for g in groups if g.params], c.epochs)

    def trained_names(self) -> list[str]:
        return self.lora_names + self.norm_names + self.head_names

    def export(self) -> TaskDiff:
        dense = {n: self.model.get_parameter(n).detach().clone() for n in self.trained_names()}
        config = {**self.config.to_dict(), "fingerprint_base": list(self.base_names)}
        extra = {"lora_params": sum(int(dense[n].numel()) for n in self.lora_names)}
        return TaskDiff(method=self.name, base_model="", task="", label_names=None, config=config,
                        sparse={}, dense=dense, extra=extra)

    def restore(self, diff: TaskDiff) -> None:
        expected = set(self.trained_names())
        if set(diff.dense) != expected:
            odd = sorted(set(diff.dense) ^ expected)[:3]
            raise DiffpruneError(f"lora: the snapshot's tensors do not match this configuration "
                                 f"(e.g. {', '.join(odd)}); was it made with other targets or ranks?")
        with torch.no_grad():
            for name, value in diff.dense.items():
                self.model.get_parameter(name).copy_(value)
