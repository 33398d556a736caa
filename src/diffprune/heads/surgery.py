"""Attention-head pruning by weight surgery for BERT, RoBERTa and DistilBERT (transformers 5.x).

transformers 5 removed `PreTrainedModel.prune_heads` and head masks, so Prune-LoRA's step 2 (remove the
least important heads, see docs METHODS.md "Prune-LoRA") is done here: the pruned heads' rows of the
query / key / value projections and the matching input columns of the attention output projection are
dropped, so memory and compute really shrink (masking a head, as the seed did, saves neither).

    from diffprune.heads import prune_heads, select_heads_to_prune, load_pruned
    prune_heads(model, select_heads_to_prune(scores, count=44))   # {layer: [original head indices]}
    model.save_pretrained("out")                                  # config.json records the pruned heads
    model = load_pruned("out")                                    # rebuilds the smaller shapes, loads weights

Head indices are always the *original* ones (0 … num_heads-1 of the unpruned model): the record
`config.diffprune_pruned_heads = {"layer": [heads]}` says which are gone, so the current position of an
original head is its rank among the heads still present. Pruning is cumulative and idempotent.

A layer that loses every head keeps its residual path: its self-attention is replaced by
`ZeroHeadAttention`, which returns an empty context (…, 0); the (now 0-input) output projection turns that
into its bias, exactly what a zero-head attention computes. The stock 5.x forward cannot run with zero
heads (`view(..., -1, head_size)` of an empty tensor is ambiguous), hence the replacement.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from diffprune.errors import DiffpruneError

CONFIG_KEY = "diffprune_pruned_heads"


@dataclass(frozen=True)
class HeadArch:
    """Where one architecture keeps its attention heads (names as in transformers 5.x modelling code).

    Fields:
        layers: attribute path from `model.base_model` to the ModuleList of transformer layers.
        attention: path inside a layer to the module owning q/k/v (and whose forward reshapes by head).
        qkv: names of the query, key and value `nn.Linear`s inside `attention`.
        out: path inside a layer to the output projection that receives the concatenated heads.
        heads_attr / hidden_attr: config attributes holding the head count and the hidden size.
        head_count_attrs: attributes of `attention` to update: name -> "heads" or "width" (heads*head_dim).
        empty: path inside a layer replaced by `ZeroHeadAttention` when no head is left.
        empty_keeps: submodules of `empty` carried over into the replacement (DistilBERT's out_lin lives
            inside its attention module; BERT's output projection sits outside `attention.self`).
    """

    layers: str
    attention: str
    qkv: tuple[str, str, str]
    out: str
    heads_attr: str
    hidden_attr: str
    head_count_attrs: dict[str, str]
    empty: str
    empty_keeps: tuple[str, ...] = ()


_BERT_LIKE = HeadArch(layers="encoder.layer", attention="attention.self", qkv=("query", "key", "value"),
                      out="attention.output.dense", heads_attr="num_attention_heads",
                      hidden_attr="hidden_size",
                      head_count_attrs={"num_attention_heads": "heads", "all_head_size": "width"},
                      empty="attention.self")
ARCHS: dict[str, HeadArch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "distilbert": HeadArch(layers="transformer.layer", attention="attention", qkv=("q_lin", "k_lin", "v_lin"),
                           out="attention.out_lin", heads_attr="n_heads", hidden_attr="dim",
                           head_count_attrs={"n_heads": "heads"}, empty="attention", empty_keeps=("out_lin",)),
}


class ZeroHeadAttention(nn.Module):
    """Stand-in for a self-attention block whose heads were all pruned.

    Returns the context a zero-head attention produces, a (…, 0) tensor, plus no attention weights; when
    the block also owned the output projection (DistilBERT) that projection is applied here, giving its
    bias at every position. Keeping the submodule names keeps state-dict keys stable across save / load.
    """

    def __init__(self, keep: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.num_heads = 0
        self.out_name = None
        for name, module in (keep or {}).items():
            self.add_module(name, module)
            self.out_name = name

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        if self.out_name is not None:
            context = getattr(self, self.out_name)(context)  # (B, T, hidden): the bias
        return context, None


# ----------------------------------------------------------------------------------------------------
# Introspection shared with importance.py


def get_arch(model: nn.Module) -> HeadArch:
    """The HeadArch of `model` (by `config.model_type`); a DiffpruneError names the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise DiffpruneError(f"attention-head importance and pruning support {', '.join(sorted(ARCHS))} models; "
                             f"this model is '{model_type}'")
    return ARCHS[model_type]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers (BertLayer / TransformerBlock …) in order."""
    return list(_get(model.base_model, get_arch(model).layers))


def num_heads(model: nn.Module) -> int:
    """Heads per layer of the *unpruned* architecture (the config keeps the original count)."""
    return int(getattr(model.config, get_arch(model).heads_attr))


def head_size(model: nn.Module) -> int:
    arch = get_arch(model)
    return int(getattr(model.config, arch.hidden_attr)) // num_heads(model)


def out_projection(model: nn.Module, layer: int) -> nn.Linear:
    """The linear layer that receives layer `layer`'s concatenated head outputs (…, heads*head_dim)."""
    return _get(transformer_layers(model)[layer], get_arch(model).out)


def pruned_heads_of(config) -> dict[int, list[int]]:
    """The pruned heads recorded in a config (or {}), as {layer: sorted original head indices}."""
    raw = getattr(config, CONFIG_KEY, None) or {}
    record = {int(layer): sorted(int(h) for h in heads) for layer, heads in raw.items() if heads}
    return dict(sorted(record.items()))


def remaining_heads(model: nn.Module) -> list[list[int]]:
    """Per layer, the original indices of the heads still present, in their current order."""
    pruned = pruned_heads_of(model.config)
    n = num_heads(model)
    return [[h for h in range(n) if h not in pruned.get(layer, ())] for layer in range(len(transformer_layers(model)))]


def current_head_counts(model: nn.Module) -> list[int]:
    """Heads each layer actually holds now, read from the output projections' weight shapes."""
    d = head_size(model)
    return [out_projection(model, layer).in_features // d for layer in range(len(transformer_layers(model)))]


# ----------------------------------------------------------------------------------------------------
# Surgery


def _check_linear(module, name: str) -> nn.Linear:
    # PEFT's LoRA layers wrap the Linear; slicing the base weight alone would leave A/B mismatched.
    if type(module) is not nn.Linear:
        raise DiffpruneError(f"cannot prune heads: '{name}' is a {type(module).__name__}, not a plain Linear "
                             "(prune heads before adding adapters such as LoRA)")
    return module


def _shrink_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along weight dim `dim` (0: output rows, 1: input columns), in place.

    In place rather than a new nn.Linear: no wasted initialisation (which also warns for 0-sized
    weights), and hooks registered on the module keep working.
    """
    weight = linear.weight.detach().index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def _normalize_heads(model: nn.Module, heads: Mapping) -> dict[int, set[int]]:
    n_layers, n_heads = len(transformer_layers(model)), num_heads(model)
    out: dict[int, set[int]] = {}
    for layer, hs in dict(heads).items():
        try:
            layer_i, hs_i = int(layer), {int(h) for h in hs}
        except (TypeError, ValueError):
            raise DiffpruneError(f"heads to prune must map a layer index to a list of head indices, "
                                 f"got {layer!r}: {hs!r}") from None
        if not 0 <= layer_i < n_layers:
            raise DiffpruneError(f"layer {layer_i} does not exist (the model has layers 0…{n_layers - 1})")
        bad = sorted(h for h in hs_i if not 0 <= h < n_heads)
        if bad:
            raise DiffpruneError(f"head(s) {bad} of layer {layer_i} do not exist (heads are 0…{n_heads - 1})")
        out.setdefault(layer_i, set()).update(hs_i)
    return out


def _check_consistent(model: nn.Module) -> None:
    """The weights must hold exactly the heads the config says remain (else the record is stale)."""
    for layer, (present, actual) in enumerate(zip(remaining_heads(model), current_head_counts(model))):
        if len(present) != actual:
            raise DiffpruneError(f"layer {layer} holds {actual} heads but the config records {len(present)}: "
                                 f"the model does not match its '{CONFIG_KEY}' record (load a saved pruned model "
                                 "with diffprune.heads.load_pruned)")


def prune_heads(model: nn.Module, heads: Mapping[int, list[int]]) -> dict[int, list[int]]:
    """Remove attention heads (original indices, {layer: [heads]}) from `model` in place.

    Drops the heads' rows of Q, K, V (weights and biases) and the matching input columns of the output
    projection, updates the attention module's head-count attributes, and records the cumulative set in
    `model.config.diffprune_pruned_heads` so it survives `save_pretrained`. Heads already pruned are
    ignored. Returns the cumulative record as {layer: sorted heads}.
    """
    arch = get_arch(model)
    _check_consistent(model)
    wanted = _normalize_heads(model, heads)
    record = pruned_heads_of(model.config)
    present = remaining_heads(model)
    d = head_size(model)
    layers = transformer_layers(model)
    for layer_i, hs in sorted(wanted.items()):
        drop = hs - set(record.get(layer_i, ()))
        if not drop:
            continue
        layer = layers[layer_i]
        keep_pos = [pos for pos, h in enumerate(present[layer_i]) if h not in drop]  # current positions
        device = _get(layer, arch.out).weight.device
        index = torch.tensor([pos * d + j for pos in keep_pos for j in range(d)], dtype=torch.long, device=device)
        attention = _get(layer, arch.attention)
        if not isinstance(attention, ZeroHeadAttention):
            for name in arch.qkv:
                _shrink_linear(_check_linear(getattr(attention, name), f"{arch.attention}.{name}"), index, 0)
        _shrink_linear(_check_linear(_get(layer, arch.out), arch.out), index, 1)
        if keep_pos:
            for attr, kind in arch.head_count_attrs.items():
                setattr(attention, attr, len(keep_pos) * (d if kind == "width" else 1))
        elif not isinstance(_get(layer, arch.empty), ZeroHeadAttention):
            empty = _get(layer, arch.empty)
            _set(layer, arch.empty, ZeroHeadAttention({k: getattr(empty, k) for k in arch.empty_keeps}))
        record[layer_i] = sorted(set(record.get(layer_i, ())) | drop)
    setattr(model.config, CONFIG_KEY, {str(k): v for k, v in sorted(record.items()) if v})
    return pruned_heads_of(model.config)


def reapply_pruning(model: nn.Module) -> dict[int, list[int]]:
    """Redo the surgery recorded in `model.config` on a full-size model (e.g. freshly built from config).

    A model whose weights already match the record is left as is. Returns the record.
    """
    record = pruned_heads_of(model.config)
    if not record:
        return {}
    get_arch(model)
    counts = current_head_counts(model)
    if all(c == num_heads(model) for c in counts):  # full size: redo the surgery from scratch
        setattr(model.config, CONFIG_KEY, {})
        return prune_heads(model, record)
    _check_consistent(model)
    return record


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise DiffpruneError(f"no weights in {path} (expected model.safetensors, its index, or pytorch_model.bin)")


def load_pruned(path, model_class=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved with `save_pretrained` after `prune_heads` (or an unpruned one), in eval mode.

    `from_pretrained` cannot: it builds the original shapes from config.json and the checkpoint's smaller
    tensors do not fit. So: build the model from its config (class from `config.architectures`, or
    `model_class`), redo the recorded surgery on it, then load the saved state dict strictly.
    """
    import transformers

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise DiffpruneError(f"no config.json in {path}: not a saved model directory")
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        model_class = transformers.AutoModelForSequenceClassification
    # Concrete classes are built directly; the Auto* classes only offer from_config.
    model = model_class(config) if issubclass(model_class, transformers.PreTrainedModel) \
        else model_class.from_config(config)
    reapply_pruning(model)
    result = model.load_state_dict(_read_state_dict(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
        raise DiffpruneError(f"weights in {path} do not fit the pruned model (missing {missing}, "
                             f"unexpected {unexpected}); was it saved by a different diffprune version?")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Selection


def select_heads_to_prune(scores: torch.Tensor, count: int | None = None, fraction: float | None = None,
                          threshold: float | None = None) -> dict[int, list[int]]:
    """The least important heads of a (layers, heads) score map, as {layer: sorted heads}.

    Give exactly one of: `count` heads, a `fraction` of all heads (rounded to the nearest count), or every
    head scoring strictly below `threshold`. NaN scores (heads already pruned) are never selected; ties
    are broken by (layer, head) order so the choice is deterministic.
    """
    given = [name for name, v in (("count", count), ("fraction", fraction), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise DiffpruneError("select heads to prune by exactly one of count, fraction or threshold "
                             f"(got {', '.join(given) or 'none'})")
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if scores.dim() != 2:
        raise DiffpruneError(f"head scores must be a (layers, heads) matrix, got shape {tuple(scores.shape)}")
    flat = scores.flatten()
    valid = torch.nonzero(~torch.isnan(flat)).flatten()
    order = valid[torch.argsort(flat[valid], stable=True)]  # least important first
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(valid):
            raise DiffpruneError(f"count must be an integer from 0 to {len(valid)} (the prunable heads), got {count!r}")
        chosen = order[:count]
    elif fraction is not None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise DiffpruneError(f"fraction must be between 0 and 1, got {fraction!r}")
        chosen = order[:int(round(float(fraction) * len(valid)))]
    else:
        chosen = order[flat[order] < float(threshold)]
    n_heads = scores.shape[1]
    out: dict[int, list[int]] = {}
    for i in sorted(chosen.tolist()):
        out.setdefault(i // n_heads, []).append(i % n_heads)
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHS", "CONFIG_KEY", "HeadArch", "ZeroHeadAttention", "get_arch", "transformer_layers", "num_heads",
           "head_size", "out_projection", "pruned_heads_of", "remaining_heads", "current_head_counts",
           "prune_heads", "reapply_pruning", "load_pruned", "select_heads_to_prune", "count_parameters"]
