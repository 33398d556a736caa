"""Attention-head pruning by weight surgery for every family `diffprune.archs` can describe (transformers 5.x).

transformers 5 removed `PreTrainedModel.prune_heads` and head masks, so Prune-LoRA's step 2 (remove the
least important heads, see docs METHODS.md "Prune-LoRA") is done here: the pruned heads' rows of the
query / key / value projections (separate, or one fused q|k|v projection: GPT-2, ModernBERT; DeBERTa's
relative-position projections too) and the matching input columns of the attention output projection are
dropped, so memory and compute really shrink (masking a head, as the seed did, saves neither).

    from diffprune.heads import prune_heads, select_heads_to_prune, load_pruned
    prune_heads(model, select_heads_to_prune(scores, count=44))   # {layer: [original head indices]}
    model.save_pretrained("out")                                  # config.json records the pruned heads
    model = load_pruned("out")                                    # rebuilds the smaller shapes, loads weights

What is pruned:
* Layers are numbered as `archs.describe` lists them: an encoder-decoder's encoder layers first, then its
  decoder layers. Only self-attention is pruned; cross-attention blocks keep every head.
* Grouped-query attention (Llama, Qwen2, Mistral: fewer key/value heads than query heads): a query head
  cannot go without the other query heads of its key/value group, so naming any head of a group removes
  the whole group (its query heads, its key and value head). The returned record lists every query head
  removed.
* Families whose attention cannot lose heads per layer are refused with the reason (T5 shares one per-head
  relative position bias over all layers; `archs.OVERRIDES["t5"]`).

Head indices are always the *original* ones (0 … num_heads-1 of the unpruned model): the record
`config.diffprune_pruned_heads = {"layer": [heads]}` says which are gone, so the current position of an
original head is its rank among the heads still present. Pruning is cumulative and idempotent.

A layer that loses every head keeps its residual path: its attention block is replaced by
`ZeroHeadAttention`, which returns an empty context (…, 0); the (now 0-input) output projection turns that
into its bias, exactly what a zero-head attention computes. The stock 5.x forward cannot run with zero
heads (`view(..., -1, head_size)` of an empty tensor is ambiguous), hence the replacement.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from diffprune.archs import Arch, Attention, describe, features
from diffprune.errors import DiffpruneError
from diffprune.heads.selection import select_heads_to_prune  # noqa: F401  (part of this module's API)

CONFIG_KEY = "diffprune_pruned_heads"
# attributes of attention modules that hold the head count / the concatenated heads' width (transformers 5.x)
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")


class ZeroHeadAttention(nn.Module):
    """Stand-in for a self-attention block whose heads were all pruned.

    Returns the context a zero-head attention produces, a (…, 0) tensor, plus no attention weights; when
    the block also owned the output projection (DistilBERT, Llama, BART, GPT-2) that projection is applied
    here, giving its bias at every position. Keeping the submodule names keeps state-dict keys stable
    across save / load. `out_path` (the output projection, relative to the layer) and `head_dim` let
    `archs.describe` still find the layer's attention.
    """
    diffprune_empty_attention = True

    def __init__(self, keep: Mapping[str, nn.Module] | None = None, out_path: str = "", head_dim: int = 0):
        super().__init__()
        self.num_heads = 0
        self.out_path, self.head_dim = out_path, head_dim
        self.out_name = None
        for name, module in (keep or {}).items():
            self.add_module(name, module)
            self.out_name = name

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        if self.out_name is not None:
            out = getattr(self, self.out_name)
            if isinstance(out, nn.Linear):
                context = out(context)  # (B, T, hidden): the bias
            else:  # GPT-2's Conv1D cannot take a 0-wide input (its view(-1, 0) is ambiguous)
                context = out.bias.expand(*hidden_states.shape[:-1], out.bias.shape[0])
        return context, None


# ----------------------------------------------------------------------------------------------------
# Introspection shared with importance.py


def get_arch(model: nn.Module) -> Arch:
    """The layout of `model` for head importance and pruning (DiffpruneError where heads cannot be pruned).

    Every layer must have a self-attention block and the same number of heads (scores form one
    (layers, heads) matrix).
    """
    arch = describe(model)
    if arch.no_head_pruning:
        raise DiffpruneError(f"attention-head importance and pruning do not support {arch.model_type}: "
                             f"{arch.no_head_pruning}")
    missing = [layer.name for layer in arch.layers if layer.attention is None]
    if missing:
        raise DiffpruneError(f"{arch.model_type}: found no self-attention block in {', '.join(missing[:3])}")
    return arch


def _self_attentions(model: nn.Module) -> list[Attention]:
    return [layer.attention for layer in get_arch(model).layers]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers (BertLayer, LlamaDecoderLayer, …) in order, encoder before decoder."""
    return [model.get_submodule(layer.name) for layer in get_arch(model).layers]


def layer_names(model: nn.Module) -> list[str]:
    """Module name of every transformer layer (e.g. `bert.encoder.layer.3`), in the order of the scores."""
    return [layer.name for layer in get_arch(model).layers]


def num_heads(model: nn.Module) -> int:
    """Query heads per layer of the *unpruned* architecture (the config keeps the original count)."""
    cfg = model.config
    counts = {getattr(cfg, f, None) for f in ("num_attention_heads",)} - {None}
    if not counts:
        counts = {a.num_heads for a in _self_attentions(model)}
    stacks = {getattr(cfg, f"{s}_attention_heads", None) for s in ("encoder", "decoder")} - {None}
    if len(stacks) > 1:
        raise DiffpruneError(f"head importance and pruning need the same head count in every layer; this "
                             f"model's encoder and decoder have {sorted(stacks)}")
    return int(next(iter(counts)))


def head_size(model: nn.Module) -> int:
    return int(_self_attentions(model)[0].head_dim)


def group_size(model: nn.Module) -> int:
    """Query heads per key/value head (grouped-query attention; 1 otherwise), from the config."""
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None)
    return num_heads(model) // kv if isinstance(kv, int) and kv > 0 else 1


def out_projection(model: nn.Module, layer: int) -> nn.Module:
    """The projection that receives layer `layer`'s concatenated head outputs (…, heads*head_dim)."""
    return model.get_submodule(_self_attentions(model)[layer].out)


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
    return [features(model.get_submodule(a.out))[0] // d for a in _self_attentions(model)]


# ----------------------------------------------------------------------------------------------------
# Surgery


def _check_plain(module, name: str) -> nn.Module:
    # PEFT's LoRA layers wrap the Linear; slicing the base weight alone would leave A/B mismatched.
    from transformers.pytorch_utils import Conv1D

    if type(module) not in (nn.Linear, Conv1D):
        raise DiffpruneError(f"cannot prune heads: '{name}' is a {type(module).__name__}, not a plain Linear "
                             "(prune heads before adding adapters such as LoRA)")
    return module


def _shrink(proj: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep `index` of the projection's outputs (`side="out"`) or inputs (`"in"`), in place.

    nn.Linear stores (out, in), GPT-2's Conv1D (in, out). In place rather than a new module: no wasted
    initialisation (which also warns for 0-sized weights), and hooks registered on the module keep working.
    """
    conv = not isinstance(proj, nn.Linear)
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    weight = proj.weight.detach().index_select(dim, index).clone()
    proj.weight = nn.Parameter(weight, requires_grad=proj.weight.requires_grad)
    if side == "out":
        if proj.bias is not None:
            proj.bias = nn.Parameter(proj.bias.detach()[index].clone(), requires_grad=proj.bias.requires_grad)
        if conv:
            proj.nf = weight.shape[1]
        else:
            proj.out_features = weight.shape[0]
    elif not conv:
        proj.in_features = weight.shape[1]


def _normalize_heads(model: nn.Module, heads: Mapping) -> dict[int, set[int]]:
    """{layer: heads} as ints, checked; with grouped-query attention each head brings its whole group."""
    n_layers, n_heads, g = len(transformer_layers(model)), num_heads(model), group_size(model)
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
        hs_i = {h // g * g + j for h in hs_i for j in range(g)}  # the key/value group of every head
        out.setdefault(layer_i, set()).update(hs_i)
    return out


def _check_consistent(model: nn.Module) -> None:
    """The weights must hold exactly the heads the config says remain (else the record is stale)."""
    for layer, (present, actual) in enumerate(zip(remaining_heads(model), current_head_counts(model))):
        if len(present) != actual:
            raise DiffpruneError(f"layer {layer} holds {actual} heads but the config records {len(present)}: "
                                 f"the model does not match its '{CONFIG_KEY}' record (load a saved pruned model "
                                 "with diffprune.heads.load_pruned)")


def _rows(positions: list[int], d: int, device) -> torch.Tensor:
    return torch.tensor([p * d + j for p in positions for j in range(d)], dtype=torch.long, device=device)


def _prune_block(model: nn.Module, layer_name: str, attn: Attention, keep_pos: list[int], g: int) -> None:
    """Shrink one self-attention block to the heads at current positions `keep_pos` (query-head order)."""
    d = attn.head_dim
    block = model.get_submodule(attn.module)
    out = model.get_submodule(attn.out)
    device = out.weight.device
    q_index = _rows(keep_pos, d, device)
    kv_index = _rows(sorted({p // g for p in keep_pos}), d, device)
    if keep_pos:
        if attn.qkv:  # fused q|k|v: three equal parts (no fused projection with GQA among the families)
            fused = _check_plain(model.get_submodule(attn.qkv), attn.qkv)
            width = features(fused)[1] // 3
            _shrink(fused, torch.cat([q_index + i * width for i in range(3)]), "out")
        else:
            q_width = features(model.get_submodule(attn.q))[1]
            _shrink(_check_plain(model.get_submodule(attn.q), attn.q), q_index, "out")
            for name in (attn.k, attn.v):
                _shrink(_check_plain(model.get_submodule(name), name), kv_index, "out")
            for child_name, child in block.named_children():  # DeBERTa's pos_key_proj / pos_query_proj
                full = f"{attn.module}.{child_name}"
                if full not in (attn.q, attn.k, attn.v, attn.out) and type(child) is nn.Linear \
                        and child.out_features == q_width:
                    _shrink(child, q_index, "out")
        _shrink(_check_plain(out, attn.out), q_index, "in")
        for a in HEAD_COUNT_ATTRS:
            if isinstance(getattr(block, a, None), int):
                setattr(block, a, len(keep_pos))
        for a in WIDTH_ATTRS:
            if isinstance(getattr(block, a, None), int):
                setattr(block, a, len(keep_pos) * d)
        return
    _shrink(_check_plain(out, attn.out), q_index, "in")
    rel = attn.module[len(layer_name) + 1:]
    out_rel = attn.out[len(layer_name) + 1:]
    keep = {n: c for n, c in block.named_children() if f"{attn.module}.{n}" == attn.out}
    replacement = ZeroHeadAttention(keep, out_rel, d)
    parent, _, child = rel.rpartition(".")
    layer = model.get_submodule(layer_name)
    setattr(layer.get_submodule(parent) if parent else layer, child, replacement)


def prune_heads(model: nn.Module, heads: Mapping[int, list[int]]) -> dict[int, list[int]]:
    """Remove attention heads (original indices, {layer: [heads]}) from `model` in place.

    Drops the heads' rows of Q, K, V (weights and biases) and the matching input columns of the output
    projection, updates the attention module's head-count attributes, and records the cumulative set in
    `model.config.diffprune_pruned_heads` so it survives `save_pretrained`. Heads already pruned are
    ignored; with grouped-query attention whole key/value groups go (see the module docstring). Returns
    the cumulative record as {layer: sorted heads}.
    """
    arch = get_arch(model)
    _check_consistent(model)
    wanted = _normalize_heads(model, heads)
    record = pruned_heads_of(model.config)
    present = remaining_heads(model)
    g = group_size(model)
    for layer_i, hs in sorted(wanted.items()):
        drop = hs - set(record.get(layer_i, ()))
        if not drop:
            continue
        layer = arch.layers[layer_i]
        keep_pos = [pos for pos, h in enumerate(present[layer_i]) if h not in drop]  # current positions
        if not getattr(model.get_submodule(layer.attention.module), "diffprune_empty_attention", False):
            _prune_block(model, layer.name, layer.attention, keep_pos, g)
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
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    # tied weights (BART's / T5's shared token embedding, tied decoder embeddings) are saved once
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if k not in params or id(params[k]) not in loaded]
    if missing or result.unexpected_keys:
        missing, unexpected = missing[:3], result.unexpected_keys[:3]
        raise DiffpruneError(f"weights in {path} do not fit the pruned model (missing {missing}, "
                             f"unexpected {unexpected}); was it saved by a different diffprune version?")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CONFIG_KEY", "ZeroHeadAttention", "get_arch", "transformer_layers", "layer_names", "num_heads",
           "head_size", "out_projection", "pruned_heads_of", "remaining_heads", "current_head_counts",
           "prune_heads", "reapply_pruning", "load_pruned", "select_heads_to_prune", "count_parameters"]
