"""Bottleneck adapters: Houlsby et al. (ICML 2019) and Pfeiffer et al. (EACL 2021, "AdapterFusion").

An adapter is a small residual bottleneck `h ← h + W_up f(W_down h)` (hidden → m → hidden) inserted into
each transformer layer of a frozen pretrained model. Trained: the adapters, every LayerNorm and the task
head; everything else stays frozen (METHODS.md, "Bottleneck adapters").

* `adapter-houlsby`: two adapters per layer, one on the output of the attention output projection and one
  on the output of the feed-forward output projection, i.e. before dropout and the residual add +
  LayerNorm that follow each of them.
* `adapter-pfeiffer`: one adapter per layer, on the output of the feed-forward output projection.

Where: `diffprune.archs` finds each layer's attention output projection and feed-forward output projection
(BERT's `attention.output.dense` / `output.dense`, GPT-2's `attn.c_proj` / `mlp.c_proj`, Llama's `o_proj` /
`down_proj`, T5's `o` / `wo`, …), so every family with a discoverable layout gets adapters, encoder and
decoder layers alike; an encoder-decoder's cross-attention gets none (the papers adapt encoders).

How they are inserted. A forward hook on the projection (`nn.Linear`, or GPT-2's Conv1D) replaces its output y with
`adapter(y)`, and the adapter is registered as a child of that projection under the name `adapter`. So the
base model's parameter names do not change (wrapping the projection in a new module would rename
`...output.dense.weight` to `...output.dense.<inner>.weight` and break fingerprinting and loading by base
names), and the adapters are ordinary parameters such as
`bert.encoder.layer.3.output.dense.adapter.down.weight`. The hook is a module-level function that finds the
adapter through the hooked module, so `copy.deepcopy(model)` gives a copy whose hooks use its own adapters.

What is stored per task: the adapters, the trained LayerNorms and the head as dense tensors. The adapters
depend on every frozen base weight without storing any of them, so `config["fingerprint_base"]` lists all
frozen base parameters and the diff refuses a base with other weights. Adapters are non-linear and cannot
be merged into the base weights (`fold` says so); load a run with `diffprune.load_task_model`, which calls
`attach` and then applies the diff.

Notes against the papers:
* Houlsby's code (google-research/adapter-bert) applies the adapter after the dropout that follows the
  projection; here it comes right before that dropout (hooking the projection needs no change to the
  transformers layer code). At evaluation time, where dropout is the identity, the two are the same function.
* Pfeiffer et al. (and the `adapters` library's Pfeiffer config) put the adapter after the feed-forward
  block's Add & Norm, add the block input again and re-apply the same LayerNorm. Here the Pfeiffer adapter
  sits where Houlsby's second one does (output of the feed-forward block, before its residual + LayerNorm),
  which is what METHODS.md describes and which works the same way for DistilBERT, whose layer code adds the
  residual inline where no hook can reach the two summands separately.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method adapter-houlsby --set bottleneck=64 --lr 1e-4 --output-dir runs/rte-adapter-houlsby
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..archs import HOW_TO_OVERRIDE, describe, features, is_norm
from ..errors import DiffpruneError, unknown_name
from ..storage import TaskDiff
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}

ADAPTER_ATTR = "adapter"  # the child name of the adapter on the hooked projection


class Bottleneck(nn.Module):
    """`x + up(f(down(x)))`, hidden → m → hidden, initialised near the identity.

    Initialisation follows Houlsby's code (adapter-bert, `adapter_init_scale=1e-3`): both projections are
    drawn from a normal distribution with standard deviation `init_std` truncated at two standard
    deviations, biases zero, so the adapter output differs from x by O(init_std²) and the model starts as
    the pretrained one. Both matrices are small but not zero: with a zero up-projection *and* zero down
    biases, f(0) = 0 for ReLU/GELU makes the gradients of both projections exactly zero and nothing would
    ever train, and a zero up-projection alone leaves the down-projection without gradient on the first step.
    """

    def __init__(self, hidden: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-3):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return x + self.up(self.act(self.down(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def _apply_adapter(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a projection: its output goes through the adapter registered on it."""
    return getattr(module, ADAPTER_ATTR)(output)


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck-adapter options (shared by Houlsby and Pfeiffer; only the default activation differs)."""
    # learning rate of the adapters and LayerNorms: 1e-4 is what Pfeiffer et al. and AdapterHub use; Houlsby
    # et al. swept {3e-5, 3e-4, 3e-3}. Much larger than full finetuning's 2e-5, as for every small-module method.
    lr: float = 1e-4
    bottleneck: int = 64          # m, the adapter's inner size (papers: 8 … 256, 64 is typical)
    activation: str = "gelu"      # f: gelu (Houlsby's code), relu (Pfeiffer), tanh or silu
    init_std: float = 1e-3        # std of the truncated-normal init of both projections (adapter-bert)
    train_layernorm: bool = True  # also train every LayerNorm (both papers do); False: adapters + head only

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise DiffpruneError(f"bottleneck is the adapter's inner size and must be a positive integer "
                                 f"(e.g. 64), got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise unknown_name("adapter activation", str(self.activation), ACTIVATIONS)
        if not isinstance(self.init_std, (int, float)) or not math.isfinite(self.init_std) or self.init_std <= 0:
            raise DiffpruneError(f"init_std must be > 0 (e.g. 1e-3): with all-zero adapter weights neither "
                                 f"projection gets a gradient; got {self.init_std!r}")
        if not isinstance(self.train_layernorm, bool):
            raise DiffpruneError(f"train_layernorm must be true or false, got {self.train_layernorm!r}")


@dataclass
class PfeifferConfig(AdapterConfig):
    activation: str = "relu"  # Pfeiffer et al. / the adapters library's Pfeiffer config use ReLU


def adapter_sites(model: nn.Module, sites: tuple[str, ...], method: str) -> list[tuple[str, nn.Module]]:
    """(full name, projection) for every place an adapter goes, in layer order (from `archs.describe`).

    Site "attention" is the self-attention's output projection, "ffn" the feed-forward output projection.
    """
    arch = describe(model)
    found = []
    for layer in arch.layers:
        for site in sites:
            name = layer.attention.out if site == "attention" and layer.attention else \
                layer.ffn_out if site == "ffn" else None
            if name is None:
                raise DiffpruneError(f"{method}: found no {'attention' if site == 'attention' else 'feed-forward'} "
                                     f"output projection in {layer.name}; {HOW_TO_OVERRIDE}")
            found.append((name, model.get_submodule(name)))
    return found


class BottleneckAdapters(Method):
    """Shared implementation; the registered subclasses choose the adapter sites and defaults."""
    sites: ClassVar[tuple[str, ...]]
    config_class = AdapterConfig
    phases = ("finetune",)
    foldable = False  # bottleneck adapters are non-linear

    def __init__(self, config: AdapterConfig, model: nn.Module, head_names: list[str]):
        super().__init__(config, model, head_names)
        type(self).attach(model, config.to_dict())
        head = set(self.head_names)
        adapters = {id(p) for m in model.modules() if isinstance(m, Bottleneck) for p in m.parameters()}
        norms = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
        named = list(model.named_parameters())
        self.adapter_names = [n for n, p in named if id(p) in adapters]
        self.layernorm_names = ([n for n, p in named if id(p) in norms and n not in head]
                                if config.train_layernorm else [])

    # --------------------------------------------------------------------------------- structure

    @classmethod
    def attach(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Insert this method's adapters in place (a model that already has exactly them is left alone)."""
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        cfg = cls.config_class.from_dict({k: v for k, v in config.items() if k in known})
        sites = adapter_sites(model, cls.sites, cls.name)
        wanted = {f"{name}.{ADAPTER_ATTR}" for name, _ in sites}
        present = {n: m for n, m in model.named_modules() if isinstance(m, Bottleneck)}
        if present:
            same = set(present) == wanted and all(
                m.down.out_features == cfg.bottleneck and m.activation == cfg.activation for m in present.values())
            if same:
                return model
            raise DiffpruneError(f"{cls.name}: the model already carries other bottleneck adapters "
                                 f"({len(present)} modules); attach to a freshly loaded base model")
        for _, proj in sites:
            adapter = Bottleneck(features(proj)[1], cfg.bottleneck, cfg.activation, cfg.init_std)
            adapter.to(device=proj.weight.device, dtype=proj.weight.dtype)
            proj.add_module(ADAPTER_ATTR, adapter)
            proj.register_forward_hook(_apply_adapter)
        return model

    @classmethod
    def fold(cls, model: nn.Module) -> nn.Module:
        raise DiffpruneError("bottleneck adapters are non-linear modules and cannot be merged into the base "
                             "weights; load the run with diffprune.load_task_model")

    # --------------------------------------------------------------------------------- training

    def trainable_names(self) -> list[str]:
        return self.adapter_names + self.layernorm_names + self.head_names

    def build_phase(self, phase: str) -> PhaseSpec:
        body_names = set(self.adapter_names) | set(self.layernorm_names)
        trainable = body_names | set(self.head_names)
        body = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in trainable)
            if n in body_names:
                body.append(p)
        c = self.config
        groups = [ParamGroup("adapters", body, c.lr, c.weight_decay), self.head_group()]
        return PhaseSpec(phase, self.model, [g for g in groups if g.params], c.epochs)

    # --------------------------------------------------------------------------------- storage

    def export(self) -> TaskDiff:
        names = self.trainable_names()
        dense = {n: self.model.get_parameter(n).detach().clone() for n in names}
        stored = set(names)
        frozen = sorted(n for n, _ in self.model.named_parameters() if n not in stored)
        config = {**self.config.to_dict(), "fingerprint_base": frozen}
        return TaskDiff(method=self.name, base_model="", task="", label_names=None, config=config,
                        sparse={}, dense=dense, extra={})

    def restore(self, diff: TaskDiff) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(set(diff.dense) - set(params))
        if missing:
            raise DiffpruneError(f"{self.name}: the snapshot names parameters this model lacks: "
                                 f"{', '.join(missing[:5])}")
        with torch.no_grad():
            for name, value in diff.dense.items():
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


@register
class HoulsbyAdapters(BottleneckAdapters):
    name = "adapter-houlsby"
    config_class = AdapterConfig
    sites = ("attention", "ffn")


@register
class PfeifferAdapters(BottleneckAdapters):
    name = "adapter-pfeiffer"
    config_class = PfeifferConfig
    sites = ("ffn",)
