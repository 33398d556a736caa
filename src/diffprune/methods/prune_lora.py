"""Prune-LoRA (seed 003, "Task-oriented Memory-efficient Pruning-Adapter"); plain head pruning (in
`head_pruning.py`) shares its machinery.

`prune-lora` follows docs METHODS.md "Prune-LoRA", in three steps that all happen in `prepare()`, before
training, on the task's own data:

1. head importance (Michel et al. 2019, `diffprune.heads.head_importance`) on the first
   `importance_examples` training examples, with the freshly initialised task head;
2. the least important heads are removed by real weight surgery (`diffprune.heads.prune_heads`: rows of
   Q, K, V and columns of the attention output projection go), so memory and compute shrink;
3. rank-varied LoRA on q, k, v, o of what is left: block importance = the sum of the layer's remaining
   heads' importances; the `top_blocks` most important layers get rank `r_high`, the others `r_low`
   (seed: 4 of 12 blocks at rank 8, the rest 4). LoRA's A and B follow the pruned shapes, e.g. a query
   that kept 8 of 12 heads is h → 8·d, so its A is r × h and its B is 8·d × r. Trained: LoRA, every
   LayerNorm, the task head.

`head-pruning` is steps 1 and 2 followed by ordinary full finetuning (`finetune: "full"`, the default) or
uniform-rank LoRA (`finetune: "lora"`): the ablation that shows what the pruning alone costs.

Both delegate training to the existing methods (`LoRA`, `FullFinetune`) built on the pruned model, so the
phases, optimizer groups and stored tensors are theirs. What is stored per task: the trained tensors
(dense) and, in the config, the pruned heads, the LoRA layout (targets and `rank_pattern`) and the
importance scores. `attach()` rebuilds the structure on a fresh base: head surgery first, then LoRA.

A merged model (`diffprune merge`) stays pruned: its Q/K/V/O are smaller than its config.json says, so
`AutoModelForSequenceClassification.from_pretrained` cannot load it; `diffprune.heads.load_pruned(path)`
can (it redoes the recorded surgery on a model built from the config, then loads the weights).

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method prune-lora --epochs 10 --output-dir runs/rte-prune-lora
    diffprune train ... --method head-pruning --set finetune=lora --set prune_count=36
    diffprune merge runs/rte-prune-lora --output runs/rte-prune-lora-merged
    python -c "from diffprune.heads import load_pruned; load_pruned('runs/rte-prune-lora-merged')"
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DiffpruneError
from ..heads.importance import head_importance
from ..heads.surgery import (get_arch, group_size, prune_heads, pruned_heads_of, select_heads_to_prune,
                             transformer_layers)
from ..storage import TaskDiff
from .base import Method, MethodConfig, PhaseSpec, register
from .lora import LoRA, LoRAConfig, _check_rank, is_lora_param, lora_layers, peft_config

log = logging.getLogger("diffprune")

DEFAULT_PRUNE_FRACTION = 0.3  # the seed keeps 100 of BERT-base's 144 heads: 44 pruned, 30.6%
FINETUNE_MODES = ("full", "lora")


# --------------------------------------------------------------------------------------------- configs

@dataclass
class HeadPruneOptions(MethodConfig):
    """Which heads go: importance on a sample of the training set, then one selection rule."""
    importance_examples: int = 256   # first N training examples scored (Michel et al. / the seed: a small sample)
    importance_batch_size: int = 32  # batch size of the importance pass (forward + backward to the head masks)
    # exactly one of the three; with none given, prune_fraction = 0.3 (the seed's 44 of 144 heads)
    prune_count: int | None = None       # prune this many heads (over all layers)
    prune_fraction: float | None = None  # prune this share of all heads, rounded to the nearest count
    prune_threshold: float | None = None  # prune every head scoring below this (scores are per-layer L2-normalised)

    def __post_init__(self):
        super().__post_init__()
        for name in ("importance_examples", "importance_batch_size"):
            _check_rank(name, getattr(self, name))  # "must be a positive integer"
        given = [n for n in ("prune_count", "prune_fraction", "prune_threshold") if getattr(self, n) is not None]
        if len(given) > 1:
            raise DiffpruneError(f"give only one of prune_count, prune_fraction, prune_threshold (got "
                                 f"{', '.join(given)}); e.g. --set prune_count=44")
        if not given:
            self.prune_fraction = DEFAULT_PRUNE_FRACTION
        c = self.prune_count
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise DiffpruneError(f"prune_count must be a non-negative integer, got {c!r}")
        f = self.prune_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0):
            raise DiffpruneError(f"prune_fraction is the share of heads removed, in [0, 1], got {f!r}")
        t = self.prune_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t)):
            raise DiffpruneError(f"prune_threshold must be a number, got {t!r}")

    def selection(self) -> dict[str, Any]:
        """Keyword arguments of `select_heads_to_prune`."""
        return {"count": self.prune_count, "fraction": self.prune_fraction, "threshold": self.prune_threshold}


@dataclass
class LoRAOptions(HeadPruneOptions):
    """LoRA fields shared by prune-lora and head-pruning's LoRA mode (meanings as in `LoRAConfig`).

    head-pruning with `finetune: "full"` has these fields too and ignores them.
    """
    alpha: float = 16.0   # α, fixed for every rank as in the LoRA paper (the update is scaled by α / r)
    dropout: float = 0.1  # dropout on the LoRA branch's input
    targets: list[str] | None = None  # module-name patterns to adapt (None: q, k, v, o of the architecture)
    train_layernorm: bool = True  # also train every LayerNorm (the seed does)
    init: str = "gaussian"        # A's init; B is zero, so training starts from the pruned model

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.targets, str):  # `--set targets=query,value` arrives as one string
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]

    def lora_config(self, rank: int, targets: list[str] | None = None,
                    rank_pattern: dict[str, int] | None = None) -> LoRAConfig:
        """The plain LoRA config with this method's shared fields (LoRAConfig validates them)."""
        return LoRAConfig(lr=self.lr, head_lr=self.head_lr, weight_decay=self.weight_decay, epochs=self.epochs,
                          rank=rank, alpha=self.alpha, dropout=self.dropout,
                          targets=targets if targets is not None else self.targets,
                          rank_pattern=dict(rank_pattern or {}), train_layernorm=self.train_layernorm,
                          init=self.init)


@dataclass
class PruneLoRAConfig(LoRAOptions):
    # lr: the seed's value is lost in the text extraction; 5e-4 is LoRA's reference value (lora.py), so
    # prune-lora and lora compare at the same learning rate. Weight decay 0.01 is the seed's.
    lr: float = 5e-4            # learning rate of the LoRA matrices and LayerNorms
    weight_decay: float = 0.01  # on LoRA matrices and the head (never on LayerNorms)
    r_high: int = 8             # LoRA rank in the `top_blocks` most important layers (seed: 8)
    r_low: int = 4              # LoRA rank in every other layer (seed: 4)
    top_blocks: int | None = None  # k layers at r_high; None: round(layers / 3), the seed's 4 of 12

    def __post_init__(self):
        super().__post_init__()
        _check_rank("r_high", self.r_high)
        _check_rank("r_low", self.r_low)
        k = self.top_blocks
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise DiffpruneError(f"top_blocks must be a non-negative integer (or unset for a third of the "
                                 f"layers), got {k!r}")
        self.lora_config(self.r_low)  # validates alpha, dropout, targets, init


# --------------------------------------------------------------------------------------------- helpers

def importance_batches(train_dataset, collate, examples: int, batch_size: int):
    """The first `examples` training examples, in order, in batches (a DataLoader without shuffling).

    Nothing here is random: the same data and the same (seeded) task head give the same scores, which is
    what `--resume` relies on when it calls `prepare()` again.
    """
    from torch.utils.data import DataLoader, Subset

    n = min(int(examples), len(train_dataset))
    if n == 0:
        raise DiffpruneError("head importance needs training examples, but the training set is empty")
    return DataLoader(Subset(train_dataset, range(n)), batch_size=batch_size, shuffle=False,
                      collate_fn=collate, num_workers=0)


def _layer_prefixes(model: nn.Module) -> list[str]:
    """Module name of every transformer layer (e.g. `bert.encoder.layer.3`), in order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in transformer_layers(model)]


def adaptable_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the modules the LoRA targets match, less those that pruning left with a 0-size side.

    A layer that lost every head has no Q/K/V any more and a 0-input output projection: LoRA there would
    add parameters that can never receive a gradient, so it is left out.
    """
    _, matched = peft_config(model, LoRAConfig(targets=targets))  # PEFT's own matching + the head check
    keep = []
    for name in matched:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.numel() == 0:
            continue
        keep.append(name)
    return keep


def block_importance(scores: torch.Tensor, pruned: dict[int, list[int]]) -> list[float]:
    """Per layer, the sum of the importances of the heads still present (the seed's block importance)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    out = []
    for layer in range(scores.shape[0]):
        gone = set(pruned.get(layer, ()))
        out.append(float(sum(scores[layer, h] for h in range(scores.shape[1]) if h not in gone)))
    return out


def top_layers(importance: list[float], k: int) -> list[int]:
    """The k layers of highest block importance (ties: lower layer first), sorted by index."""
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(order[:k])


def rank_pattern_for(model: nn.Module, modules: list[str], layers: list[int], rank: int) -> dict[str, int]:
    """PEFT `rank_pattern` giving `rank` to every adapted module of `layers`, one key per layer.

    PEFT matches a key as the regex `(.*\\.)?(key)$` against module names, so the key is the layer's
    escaped module path followed by `\\..*`: it matches the adapted modules of that layer and nothing
    else (`layer\\.1\\.` cannot match `layer.11.`). This is checked, not assumed.
    """
    prefixes = _layer_prefixes(model)
    pattern: dict[str, int] = {}
    for layer in layers:
        key = re.escape(prefixes[layer]) + r"\..*"
        hits = {m for m in modules if re.match(rf"(.*\.)?({key})$", m)}
        want = {m for m in modules if m.startswith(prefixes[layer] + ".")}
        if hits != want:  # pragma: no cover - a guard on the regex above
            raise DiffpruneError(f"rank_pattern key {key!r} matches {sorted(hits)}, not {sorted(want)}")
        if want:
            pattern[key] = rank
    return pattern


def _heads_key(record: dict) -> dict[str, list[int]]:
    """{layer: heads} with string keys, as JSON stores it."""
    return {str(int(k)): sorted(int(h) for h in v) for k, v in sorted(record.items(), key=lambda kv: int(kv[0]))
            if v}


def _as_record(stored) -> dict[int, list[int]]:
    return {int(k): sorted(int(h) for h in v) for k, v in (stored or {}).items() if v}


def _nested(scores: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in scores.tolist()]


# --------------------------------------------------------------------------------------------- methods

class PrunedMethod(Method):
    """Head importance and pruning in `prepare()`; training is delegated to an inner method built after.

    Subclasses say how the inner method is built (`_build_inner`) and how a stored config describes LoRA
    (`_stored_lora`, None when there is none). Public, with `LoRAOptions`, because `head_pruning.py`
    builds on both.
    """
    foldable = False  # a head-pruned model loads only through diffprune.heads.load_pruned
    phases = ("finetune",)

    def __init__(self, config: HeadPruneOptions, model: nn.Module, head_names: list[str]):
        super().__init__(config, model, head_names)
        get_arch(model)  # a family whose heads cannot be pruned (T5) fails before any data is touched
        self.inner: Method | None = None
        self.scores: torch.Tensor | None = None  # (layers, heads), before pruning
        self.pruned: dict[int, list[int]] = {}
        self.layout: dict[str, Any] = {}        # what, besides the config, attach() needs (stored)

    # ----------------------------------------------------------------------------- prepare
    def prepare(self, train_dataset, collate) -> None:
        if self.inner is not None:
            raise DiffpruneError(f"{self.name}: prepare() already pruned this model; build the method again "
                                 "on a fresh base model")
        if pruned_heads_of(self.model.config):
            raise DiffpruneError(f"{self.name}: the model is already head-pruned; start from the unpruned base")
        c = self.config
        start = time.perf_counter()
        batches = importance_batches(train_dataset, collate, c.importance_examples, c.importance_batch_size)
        self.scores = head_importance(self.model, batches)  # eval mode, no weight gradients
        # grouped-query attention: whole key/value groups are chosen (see select_heads_to_prune)
        selection = select_heads_to_prune(self.scores, **c.selection(), group=group_size(self.model))
        self.pruned = prune_heads(self.model, selection)
        # reported with the phase's training figures in metrics.json (the seed calls this step negligible)
        self.phase_stats = {"finetune": {"importance_seconds": round(time.perf_counter() - start, 2),
                                         "pruned_heads": sum(map(len, self.pruned.values()))}}
        log.info("%s: pruned %d of %d heads %s", self.name, sum(map(len, self.pruned.values())),
                 self.scores.numel(), self.pruned)
        self.inner = self._build_inner()

    def _build_inner(self) -> Method:
        raise NotImplementedError

    def _ready(self) -> Method:
        if self.inner is None:
            raise DiffpruneError(f"{self.name}: call prepare(train_dataset, collate) first (the training "
                                 "pipeline does): the heads to prune are chosen on the task's training data")
        return self.inner

    # ----------------------------------------------------------------------------- phases
    def build_phase(self, phase: str) -> PhaseSpec:
        return self._ready().build_phase(phase)

    def end_phase(self, phase: str) -> None:
        self._ready().end_phase(phase)

    def eval_model(self) -> nn.Module:
        return self._ready().eval_model()

    def export(self) -> TaskDiff:
        diff = self._ready().export()
        diff.method = self.name
        fingerprint_base = diff.config.get("fingerprint_base")
        diff.config = {**self.config.to_dict(), "pruned_heads": _heads_key(self.pruned), **self.layout,
                       "importance": _nested(self.scores)}
        if fingerprint_base is not None:
            diff.config["fingerprint_base"] = fingerprint_base
        plain = [p for n, p in self.model.named_parameters() if not is_lora_param(n) and n not in self.head_names]
        diff.extra.update({"pruned_heads": sum(map(len, self.pruned.values())), "heads": int(self.scores.numel()),
                           "pruned_model_params": sum(p.numel() for p in plain)})
        return diff

    def restore(self, diff: TaskDiff) -> None:
        inner = self._ready()
        stored = _as_record(diff.config.get("pruned_heads"))
        if stored != self.pruned:
            raise DiffpruneError(f"{self.name}: the snapshot was made with pruned heads {stored}, this run "
                                 f"pruned {self.pruned}; were the data, seed or options changed?")
        inner.restore(diff)

    # ----------------------------------------------------------------------------- reloading
    @classmethod
    def _stored_lora(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        return None

    @classmethod
    def attach(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Head surgery from `config["pruned_heads"]`, then the stored LoRA layout (idempotent)."""
        if "pruned_heads" not in config:
            raise DiffpruneError(f"{cls.name}: the stored config has no 'pruned_heads'; was this diff made "
                                 f"by the {cls.name} method?")
        want = _as_record(config["pruned_heads"])
        have = pruned_heads_of(model.config)
        if have and have != want:
            raise DiffpruneError(f"{cls.name}: the model is already pruned differently ({have}) from the "
                                 f"diff ({want}); load the unpruned base model")
        if not have and want:
            if lora_layers(model):
                raise DiffpruneError(f"{cls.name}: the model has LoRA layers but no head pruning; load the "
                                     "unpruned base model")
            prune_heads(model, want)
        lora = cls._stored_lora(config)
        if lora is not None:
            LoRA.attach(model, lora)  # a no-op when the LoRA layers are already there
        return model

    @classmethod
    def fold(cls, model: nn.Module) -> nn.Module:
        """Fold LoRA (if any) into the pruned weights. The result stays pruned: load it with load_pruned."""
        if lora_layers(model):
            LoRA.fold(model)
        if pruned_heads_of(model.config):
            log.warning("this model is head-pruned (config.%s): AutoModel*.from_pretrained cannot load it "
                        "once saved; use diffprune.heads.load_pruned(path)", "diffprune_pruned_heads")
        return model


@register
class PruneLoRA(PrunedMethod):
    """Importance-oriented head pruning + importance-oriented rank-varied LoRA (see the module docstring)."""
    name = "prune-lora"
    config_class = PruneLoRAConfig

    def _build_inner(self) -> Method:
        c: PruneLoRAConfig = self.config
        importance = block_importance(self.scores, self.pruned)
        layers = len(importance)
        k = round(layers / 3) if c.top_blocks is None else c.top_blocks
        if k > layers:
            raise DiffpruneError(f"top_blocks is {k} but the model has only {layers} layers")
        high = top_layers(importance, k)
        modules = adaptable_modules(self.model, c.targets)
        if not modules:
            raise DiffpruneError("prune-lora: every head was pruned, so nothing is left to adapt; prune fewer")
        pattern = rank_pattern_for(self.model, modules, high, c.r_high) if c.r_high != c.r_low else {}
        self.layout = {"lora_targets": modules, "rank_pattern": pattern, "block_importance": importance,
                       "high_rank_layers": high}
        return LoRA(c.lora_config(c.r_low, modules, pattern), self.model, self.head_names)

    @classmethod
    def _stored_lora(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        known = {k: v for k, v in config.items() if k in PruneLoRAConfig.__dataclass_fields__}
        c = PruneLoRAConfig.from_dict(known)
        return c.lora_config(c.r_low, config["lora_targets"], config.get("rank_pattern") or {}).to_dict()


__all__ = ["PruneLoRA", "PruneLoRAConfig", "HeadPruneOptions", "LoRAOptions", "PrunedMethod", "FINETUNE_MODES",
           "importance_batches", "adaptable_modules", "block_importance", "top_layers", "rank_pattern_for",
           "DEFAULT_PRUNE_FRACTION"]
