"""Model-family knowledge in one place: layers, attention blocks, feed-forward outputs and the task head.

Every method, `inspect`'s statistics and the report ask this module, so no other file guesses from
BERT's names. The layout is *discovered* from the loaded model, not looked up by `model_type`:

* transformer layers: every outermost `nn.ModuleList` under the base model whose entries are all of one
  class and each hold linear projections (BERT's `encoder.layer`, GPT-2's `h`, Llama's `layers`, T5's
  `encoder.block` and `decoder.block`). A list under an `encoder` / `decoder` module forms that stack, so
  an encoder-decoder's layers are numbered per stack ("encoder.layer.1", "decoder.layer.1").
* attention: inside a layer, the modules that own query/key/value projections (separate, or one fused
  q|k|v projection such as GPT-2's `c_attn` or ModernBERT's `Wqkv`), found by the projection names
  transformers uses; the first per layer is the self-attention, later ones are cross-attention. The output
  projection is the linear layer after them that maps the concatenated heads back to the hidden size.
* head count / head size / key-value heads: the attention module's own attributes, else the config's
  standard fields (`num_attention_heads`, `num_key_value_heads`, `head_dim`, …), checked against the
  projection shapes, so grouped-query attention (k/v narrower than q) is seen as such.
* the feed-forward output: the last linear layer of the layer outside attention that maps to the hidden size.
* the task head: the parameters of a task model outside its base model (`model.base_model`), i.e. the
  modules the task class adds: `classifier`, `score`, `classification_head`, DeBERTa's `pooler`, …

`OVERRIDES` (by `config.model_type`) covers families discovery gets wrong; an override may also come from
a JSON file named by the environment variable `DIFFPRUNE_ARCH` (same fields, by model type). When
discovery fails, the DiffpruneError says what was not found and how to override it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .errors import DiffpruneError

# Names transformers gives query/key/value projections (separate) and fused q|k|v projections.
Q_NAMES = ("query", "q_proj", "q_lin", "q", "query_proj")
K_NAMES = ("key", "k_proj", "k_lin", "k", "key_proj")
V_NAMES = ("value", "v_proj", "v_lin", "v", "value_proj")
FUSED_NAMES = ("c_attn", "Wqkv", "qkv", "qkv_proj", "query_key_value")
# Names of output projections that live inside the attention block (BERT's sits after it, in `output.dense`)
OUT_NAMES = ("out_proj", "o_proj", "out_lin", "o", "c_proj", "Wo", "dense", "out")
HEAD_COUNT_FIELDS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
HEAD_DIM_FIELDS = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv")

# Per `config.model_type`, fields that replace what discovery finds (paths relative to the task model for
# "layers", to a layer for the others). Keys: layers (list of ModuleList paths), attention, q, k, v, qkv,
# out, ffn_out (paths inside a layer), num_heads, num_kv_heads, head_dim (ints), head (top-level modules),
# no_head_pruning (a reason string: head surgery is refused for this family).
OVERRIDES: dict[str, dict] = {
    # T5 computes one relative position bias (per head) in its first layer and adds it in every later
    # layer, so heads cannot be removed per layer without rewriting that bias path
    "t5": {"no_head_pruning": "T5 shares one per-head relative position bias across all layers of a stack"},
    "mt5": {"no_head_pruning": "mT5 shares one per-head relative position bias across all layers of a stack"},
}
ENV_FILE = "DIFFPRUNE_ARCH"
HOW_TO_OVERRIDE = (f"add an entry for this model type to diffprune.archs.OVERRIDES, or name a JSON file "
                   f"{{model_type: {{field: value}}}} in ${ENV_FILE} (fields: layers, attention, q, k, v, qkv, "
                   f"out, ffn_out, num_heads, num_kv_heads, head_dim, head)")


@dataclass
class Attention:
    """One attention block of a layer (full module names; `qkv` set instead of q/k/v when fused)."""
    module: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    out: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cross: bool = False

    @property
    def projections(self) -> list[str]:
        """q, k, v (or the fused one) and the output projection: LoRA's default targets (none when pruned away)."""
        return [n for n in (self.q, self.k, self.v, self.qkv) if n] + [self.out] if self.num_heads else []

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1


@dataclass
class Layer:
    name: str            # module name, e.g. "bert.encoder.layer.3"
    stack: str           # "" for a single stack, else "encoder" / "decoder"
    index: int           # position within its stack
    attention: Attention | None   # self-attention (None when head pruning removed the whole block)
    cross_attention: list[Attention] = field(default_factory=list)
    ffn_out: str | None = None

    @property
    def group(self) -> str:
        """The layer's group name in statistics: "layer.N" or "encoder.layer.N" / "decoder.layer.N"."""
        return f"{self.stack + '.' if self.stack else ''}layer.{self.index}"


@dataclass
class Arch:
    model_type: str
    layers: list[Layer]
    head: list[str]      # parameter names of the task head
    no_head_pruning: str | None = None

    @property
    def stacks(self) -> list[str]:
        return list(dict.fromkeys(layer.stack for layer in self.layers))

    def layer_of(self, param_name: str) -> Layer | None:
        for layer in self.layers:
            if param_name.startswith(layer.name + "."):
                return layer
        return None

    def attentions(self, cross: bool = True) -> list[Attention]:
        out = []
        for layer in self.layers:
            out += [layer.attention] if layer.attention is not None else []
            out += layer.cross_attention if cross else []
        return out


# ---------------------------------------------------------------------------------------------- overrides

def overrides_for(model_type: str | None) -> dict:
    """The override fields of `model_type`: the built-in table, then the JSON file in $DIFFPRUNE_ARCH."""
    out = dict(OVERRIDES.get(model_type or "", {}))
    path = os.environ.get(ENV_FILE)
    if path:
        try:
            table = json.loads(Path(path).expanduser().read_text())
        except (OSError, ValueError) as exc:
            raise DiffpruneError(f"${ENV_FILE}={path} is not a readable JSON file ({exc})") from exc
        if not isinstance(table, dict):
            raise DiffpruneError(f"${ENV_FILE}={path} must hold a JSON object {{model_type: {{field: value}}}}")
        out.update(table.get(model_type or "", {}))
    return out


# ---------------------------------------------------------------------------------------------- discovery

def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or hasattr(module, "base_layer")  # PEFT-wrapped too


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear, GPT-2's Conv1D (weight stored in × out) or a PEFT-wrapped one."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    return base, prefix


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _stack_of(path: str) -> str:
    parts = path.split(".")
    for stack in ("decoder", "encoder"):
        if stack in parts:
            return stack
    return ""


def _layer_lists(model: nn.Module, over: dict) -> list[tuple[str, nn.ModuleList]]:
    if "layers" in over:
        try:
            return [(p, model.get_submodule(p)) for p in over["layers"]]
        except AttributeError as exc:
            raise DiffpruneError(f"override 'layers' names a module the model lacks ({exc})") from exc
    base, _ = _base(model)
    base_name = next((n for n, m in model.named_modules() if m is base), "")
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if base_name and not name.startswith(base_name + "."):
            continue
        if any(name.startswith(f + ".") for f, _ in found):
            continue  # nested in a layer already found (T5's block.N.layer)
        if len({type(m) for m in module}) != 1:
            continue
        if all(any(_is_projection(s) for s in m.modules()) for m in module):
            found.append((name, module))
    return found


def _config_int(model: nn.Module, stack: str, fields: tuple[str, ...]) -> int | None:
    cfg = model.config
    for f in ((f"{stack}_attention_heads",) if stack and fields is HEAD_COUNT_FIELDS else ()) + fields:
        value = getattr(cfg, f, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attentions(model, layer_name: str, layer: nn.Module, stack: str, over: dict) -> list[Attention]:
    """Every attention block of one layer, self-attention first."""
    hidden = _hidden_size(model)
    found = []
    if "attention" in over:
        candidates = [(over["attention"], layer.get_submodule(over["attention"]))]
    else:
        candidates = [(n, m) for n, m in layer.named_modules()]
    for rel, module in candidates:
        prefix = f"{layer_name}.{rel}" if rel else layer_name
        if getattr(module, "diffprune_empty_attention", False):  # heads.ZeroHeadAttention: all heads pruned
            found.append(Attention(prefix, None, None, None, None, f"{layer_name}.{module.out_path}", 0, 0,
                                   module.head_dim, cross=bool(found)))
            continue
        kids = dict(module.named_children())
        q, k, v = (_pick(kids, names, over.get(key)) for names, key in ((Q_NAMES, "q"), (K_NAMES, "k"), (V_NAMES, "v")))
        qkv = _pick(kids, FUSED_NAMES, over.get("qkv")) if not (q and k and v) else None
        if not (q and k and v) and not qkv:
            continue
        q_in = features(kids[q] if q else kids[qkv])[0]
        out = over.get("out")
        if out is None:
            out = _find_out(layer, rel, {q, k, v, qkv} - {None}, hidden or q_in)
        if out is None:
            raise DiffpruneError(f"{model.config.model_type}: found the attention block {prefix} but no output "
                                 f"projection back to the hidden size; {HOW_TO_OVERRIDE} (field 'out')")
        width = features(layer.get_submodule(out))[0]
        heads = over.get("num_heads") or next((getattr(module, a) for a in HEAD_COUNT_FIELDS
                                               if isinstance(getattr(module, a, None), int)), None) \
            or _config_int(model, stack, HEAD_COUNT_FIELDS)
        dim = over.get("head_dim") or next((getattr(module, a) for a in HEAD_DIM_FIELDS
                                            if isinstance(getattr(module, a, None), int)), None) \
            or _config_int(model, stack, ("head_dim",))
        if heads is None and dim:
            heads = width // dim
        if heads is None:
            raise DiffpruneError(f"{model.config.model_type}: no head count for {prefix} (no num_attention_heads "
                                 f"or similar on the module or the config); {HOW_TO_OVERRIDE} (field 'num_heads')")
        dim = dim or width // heads
        if heads * dim != width:
            # a pruned model: the module keeps its head size, its width tells the heads left
            heads = width // dim
        kv_out = features(kids[k])[1] if k else None
        kv_heads = over.get("num_kv_heads") or (kv_out // dim if kv_out else heads)
        if not kv_heads or heads % kv_heads:
            raise DiffpruneError(f"{model.config.model_type}: {prefix} has {heads} query heads but {kv_heads} "
                                 f"key/value heads; {HOW_TO_OVERRIDE} (field 'num_kv_heads')")
        full = lambda n: f"{prefix}.{n}"
        found.append(Attention(prefix, q and full(q), k and full(k), v and full(v), qkv and full(qkv),
                               f"{layer_name}.{out}", heads, kv_heads, dim, cross=bool(found)))
    return found


def _pick(kids: dict[str, nn.Module], names: tuple[str, ...], override: str | None) -> str | None:
    """The override, else the first of `names` that is a projection among `kids`."""
    return override or next((n for n in names if n in kids and _is_projection(kids[n])), None)


def _find_out(layer: nn.Module, rel: str, qkv_names: set, hidden: int) -> str | None:
    """The projection after the attention block `rel` of `layer` taking the heads back to `hidden`.

    Searched first among the block's own children (DistilBERT's out_lin, T5's o, Llama's o_proj), then in
    the layer in module order after the block (BERT's `attention.output.dense`).
    """
    block = layer.get_submodule(rel) if rel else layer
    for name, child in block.named_children():  # not DeBERTa's pos_key_proj: it has the same shape
        if name in OUT_NAMES and name not in qkv_names and _is_projection(child) and features(child)[1] == hidden:
            return f"{rel}.{name}" if rel else name
    after = False
    for name, module in layer.named_modules():
        if name == rel:
            after = True
            continue
        if after and not name.startswith(rel + ".") and _is_projection(module) and features(module)[1] == hidden:
            return name
    return None


def _ffn_out(layer: nn.Module, attn_rel: set[str], hidden: int, over: dict) -> str | None:
    if "ffn_out" in over:
        return over["ffn_out"]
    last, seen = None, []
    for name, module in layer.named_modules():
        if any(name == a or name.startswith(a + ".") for a in attn_rel):
            continue
        if any(name.startswith(p + ".") for p in seen):
            continue  # inside a projection: PEFT's base_layer / lora_B, an adapter's up-projection
        if _is_projection(module):
            seen.append(name)
            if features(module)[1] == hidden:
                last = name
    return last


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, torch's or a family's own (LlamaRMSNorm, T5LayerNorm, …): trained by adapters."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (
        type(module).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(getattr(module, "weight", None),
                                                                               nn.Parameter))


def task_head_names(model: nn.Module) -> list[str]:
    """Parameters of the modules the task class adds around its base model (its own head module).

    For BERT that is `classifier`, for DistilBERT `pre_classifier` + `classifier`, GPT-2 / Llama `score`,
    BART / T5 `classification_head`, DeBERTa `pooler` + `classifier`; for question answering (every family's
    `…ForQuestionAnswering`) the span head `qa_outputs` (ModernBERT's `head` + `classifier`). An override's "head" lists top-level
    module names instead.
    """
    over = overrides_for(getattr(getattr(model, "config", None), "model_type", None))
    base, prefix = _base(model)
    if "head" in over:
        return [n for n, _ in model.named_parameters() if n.split(".")[0] in over["head"]]
    if not prefix:
        # a task class that holds the base model's parts itself (T5ForQuestionAnswering: shared, encoder,
        # decoder, qa_outputs) has no base-model prefix; its head is its top-level head module. A bare base
        # model has none.
        return [n for n, _ in model.named_parameters() if n.split(".")[0] in TASK_HEAD_MODULES]
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix + ".")]


def describe(model: nn.Module) -> Arch:
    """The layout of `model` (see the module docstring); a DiffpruneError says what was not found."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    over = overrides_for(model_type)
    hidden = _hidden_size(model)
    lists = _layer_lists(model, over)
    if not lists:
        raise DiffpruneError(f"{model_type}: found no transformer layers (no module list of identical blocks "
                             f"with linear projections); {HOW_TO_OVERRIDE} (field 'layers')")
    layers = []
    two_stacks = len({_stack_of(path) for path, _ in lists}) > 1
    for path, modules in lists:
        stack = _stack_of(path) if two_stacks else ""
        for i, layer in enumerate(modules):
            name = f"{path}.{i}"
            attns = _attentions(model, name, layer, stack, over)
            rel = {a.module[len(name) + 1:] for a in attns}
            ffn = _ffn_out(layer, rel, hidden, over) if hidden else None
            layers.append(Layer(name, stack, i, attns[0] if attns else None, attns[1:],
                                f"{name}.{ffn}" if ffn else None))
    if not any(layer.attention for layer in layers):
        raise DiffpruneError(f"{model_type}: found {len(layers)} transformer layers but no attention block with "
                             f"query/key/value projections in them; {HOW_TO_OVERRIDE} (fields 'attention', "
                             "'q', 'k', 'v' or 'qkv', 'out')")
    return Arch(model_type, layers, task_head_names(model), over.get("no_head_pruning"))


# ---------------------------------------------------------------------------------------------- names only

_LAYER_NAME = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
_EMBED_PARTS = {"wte", "wpe", "shared"}  # GPT-2's embeddings, the shared token embedding of BART / T5
# Top-level modules transformers' task classes add (for diffs read without their model)
# Heads of task classes that hold no base-model module (T5ForQuestionAnswering)
TASK_HEAD_MODULES = ("qa_outputs", "classification_head", "classifier", "score")
HEAD_MODULE_NAMES = {"classifier", "pre_classifier", "score", "qa_outputs", "classification_head", "lm_head",
                     "cls", "pooler", "head"}


def two_stacks(names) -> bool:
    """Whether parameter `names` come from an encoder-decoder (some layer sits under a `decoder`)."""
    return any((m := _LAYER_NAME.search(n)) and _stack_of(n[:m.start()]) == "decoder" for n in names)


def layer_group(name: str, stacks: bool | None = None) -> str:
    """Group a parameter name without its model: "embeddings", "layer.N", "head" (task head) or "other".

    For statistics of a stored diff (`inspect`, the report), where no model is at hand. The first layer
    index in the name counts (T5's `block.0.layer.1` is layer 0). With `stacks` (an encoder-decoder, see
    `two_stacks`; None: decided from this name alone) layers are "encoder.layer.N" / "decoder.layer.N".
    """
    parts = name.split(".")
    if parts[0] in HEAD_MODULE_NAMES:
        return "head"
    match = _LAYER_NAME.search(name)
    if match:
        stack = _stack_of(name[:match.start()])
        if stacks is None:
            stacks = stack == "decoder"
        return f"{stack + '.' if stacks and stack else ''}layer.{int(match.group(1))}"
    if any(p.startswith("embed") or p in _EMBED_PARTS for p in parts):
        return "embeddings"
    return "other"


def group_order(group: str) -> tuple:
    """Sort key: embeddings, (encoder) layers, decoder layers, other, head."""
    if group == "embeddings":
        return (0, 0, 0)
    m = re.fullmatch(r"(?:(encoder|decoder)\.)?layer\.(\d+)", group)
    if m:
        return (1, 1 if m.group(1) == "decoder" else 0, int(m.group(2)))
    return (2, 0, 0) if group == "other" else (3, 0, 0)


__all__ = ["Arch", "Attention", "Layer", "OVERRIDES", "describe", "task_head_names", "layer_group", "two_stacks",
           "group_order", "features", "is_norm", "HOW_TO_OVERRIDE"]
