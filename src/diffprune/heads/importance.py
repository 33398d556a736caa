"""Task-oriented attention-head importance (Michel, Levy, Neubig 2019, "Are Sixteen Heads Really Better
than One?"), step 1 of Prune-LoRA (docs METHODS.md).

Every head's output is multiplied by a mask variable ξ_h = 1; the importance of a head is
`I_h = Σ_batches |∂L/∂ξ_h| / (number of non-padding tokens)`, then each layer's row is divided by its L2
norm. As in Michel et al.'s code, the absolute value is taken per batch (of the batch-mean loss), the model
is in eval mode (no dropout), and only the masks need gradients: every model parameter is frozen while
the scores are computed, so no weight gradient is ever computed or stored.

The mask is applied by a forward pre-hook on the output projection, whose input is the concatenation of
the heads' context vectors (…, heads*head_dim): reshaping to (…, heads, head_dim) and scaling by ξ is the
same as scaling each head's output, with no change to the model's code. transformers 5.x has no
`head_mask` argument any more, so this is also how a head is switched off for comparisons (ξ_h = 0).

    from diffprune.heads import run_importance
    run_importance("minilm", "rte", "data/glue", "out/importance")   # importance.json/.safetensors/.png
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from diffprune.errors import DiffpruneError
from diffprune.heads.surgery import (current_head_counts, get_arch, head_size, load_pruned, num_heads,
                                     out_projection, pruned_heads_of, remaining_heads)
from diffprune.io import atomic_write, atomic_write_json

EPS = 1e-20  # Michel et al.'s epsilon for the per-layer normalisation


@contextmanager
def head_masks(model: nn.Module, masks: torch.Tensor | Sequence[torch.Tensor]):
    """Scale every head's output by a mask while the context is open.

    `masks` is a (layers, heads) tensor, or one 1-D tensor per layer with that layer's *current* head
    count (for a pruned model). A 0 switches a head off; ones with requires_grad make importance scores.
    """
    get_arch(model)
    counts = current_head_counts(model)
    if len(masks) != len(counts):
        raise DiffpruneError(f"head masks cover {len(masks)} layers but the model has {len(counts)}")
    d = head_size(model)
    handles = []

    def make_hook(layer: int, mask: torch.Tensor):
        def hook(module, args):
            x = args[0]  # (B, T, heads*head_dim)
            shape = x.shape
            x = x.reshape(*shape[:-1], mask.numel(), d) * mask.to(x.dtype).view(-1, 1)  # (B, T, heads, head_dim)
            return (x.reshape(shape), *args[1:])
        return hook

    try:
        for layer, (mask, n) in enumerate(zip(masks, counts)):
            if mask.numel() != n:
                raise DiffpruneError(f"layer {layer} has {n} heads but its mask has {mask.numel()} entries")
            handles.append(out_projection(model, layer).register_forward_pre_hook(make_hook(layer, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def importance_sums(model: nn.Module, batches: Iterable[Mapping], progress: bool = False):
    """(per-layer Σ_batches |∂L/∂ξ| as a list of 1-D tensors, number of non-padding tokens).

    The raw ingredients of `head_importance`; the model's requires_grad flags and train/eval mode are
    restored afterwards, even on error.
    """
    from tqdm.auto import tqdm

    get_arch(model)
    device = next(model.parameters()).device
    masks = [torch.ones(n, device=device, requires_grad=True) for n in current_head_counts(model)]
    sums = [torch.zeros(n, dtype=torch.float64) for n in current_head_counts(model)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with head_masks(model, masks):
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, desc="head importance", unit="batch", disable=not progress):
                if "labels" not in batch and "start_positions" not in batch:  # classification / QA spans
                    raise DiffpruneError("head importance needs batches with 'labels' (or QA's 'start_positions'): "
                                         "it differentiates the task loss")
                batch = _to_device(batch, device)
                loss = model(**batch).loss
                # autograd.grad, not backward(): nothing is accumulated into any .grad attribute
                grads = torch.autograd.grad(loss, masks, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s += g.detach().abs().double().cpu()
                mask = batch.get("attention_mask")
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise DiffpruneError("head importance got no tokens: the batches are empty")
    return sums, tokens


def head_importance(model: nn.Module, batches: Iterable[Mapping], normalize: bool = True,
                    progress: bool = False) -> torch.Tensor:
    """Michel et al.'s head importance as a (layers, heads) float32 tensor.

    `batches` is any iterable of dicts of tensors with `labels` (a list of batches or a DataLoader).
    Scores are Σ|∂L/∂ξ| / tokens; with `normalize`, each layer's row is divided by its L2 norm. Heads
    already removed by `prune_heads` get NaN (their original positions are kept).
    """
    sums, tokens = importance_sums(model, batches, progress=progress)
    return _scores(model, sums, tokens, normalize)


def _scores(model: nn.Module, sums: list[torch.Tensor], tokens: int, normalize: bool) -> torch.Tensor:
    """Per-token scores in original head positions (NaN where pruned), optionally L2-normalised per layer."""
    scores = torch.full((len(sums), num_heads(model)), float("nan"), dtype=torch.float64)
    for layer, (s, present) in enumerate(zip(sums, remaining_heads(model))):
        row = s / tokens
        if normalize:
            row = row / (row.norm(p=2) + EPS)
        scores[layer, present] = row
    return scores.float()


# ----------------------------------------------------------------------------------------------------
# Saving, loading, plotting


def _nan_to_none(values):
    return [None if math.isnan(v) else v for v in values]


@dataclass
class HeadImportance:
    """A (layers, heads) importance map with the metadata of how it was computed.

    `ranking` lists heads most important first (NaN = already pruned, left out); `layer_importance` is
    each layer's sum, Prune-LoRA's block importance for choosing LoRA ranks.
    """

    scores: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def ranking(self) -> list[dict]:
        flat = self.scores.flatten().tolist()
        n = self.scores.shape[1]
        order = sorted((i for i, v in enumerate(flat) if not math.isnan(v)), key=lambda i: (-flat[i], i))
        return [{"rank": r + 1, "layer": i // n, "head": i % n, "score": flat[i]} for r, i in enumerate(order)]

    @property
    def layer_importance(self) -> list[float]:
        return torch.nan_to_num(self.scores.double(), nan=0.0).sum(dim=1).tolist()

    def to_json(self) -> dict:
        layers, heads = self.scores.shape
        return {"num_layers": layers, "num_heads": heads,
                "scores": [_nan_to_none(row) for row in self.scores.tolist()],
                "layer_importance": self.layer_importance, "ranking": self.ranking, "meta": self.meta}

    def save(self, out_dir) -> dict[str, Path]:
        """Write importance.json and importance.safetensors into `out_dir`, each atomically."""
        from safetensors.torch import save_file

        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "importance.json", self.to_json())
        tensors = {"scores": self.scores.detach().float().cpu().contiguous()}
        metadata = {"meta": json.dumps(self.meta, default=str)}
        atomic_write(out / "importance.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return {"json": out / "importance.json", "safetensors": out / "importance.safetensors"}

    @classmethod
    def load(cls, out_dir) -> "HeadImportance":
        from safetensors import safe_open

        path = Path(out_dir).expanduser() / "importance.safetensors"
        if not path.is_file():
            raise DiffpruneError(f"no importance scores at {path} (compute them with run_importance first)")
        with safe_open(str(path), framework="pt") as f:
            scores = f.get_tensor("scores")
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return cls(scores, meta)



def save_importance(scores: torch.Tensor, out_dir, meta: dict | None = None) -> dict[str, Path]:
    """Write importance.json (scores, layer sums, ranking, meta) and importance.safetensors to `out_dir`."""
    return HeadImportance(torch.as_tensor(scores), dict(meta or {})).save(out_dir)


def load_importance(out_dir) -> HeadImportance:
    """Read what `save_importance` wrote (scores bit-exact from the safetensors file)."""
    return HeadImportance.load(out_dir)


def plot_importance(scores: torch.Tensor, path, title: str | None = None) -> Path:
    """A layers × heads heatmap with each cell annotated, written as PNG (atomically).

    Uses matplotlib's object API with the Agg canvas, so no global backend or pyplot state is touched.
    Pruned heads (NaN) are shown blank and marked "×".
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = torch.as_tensor(scores).detach().float().cpu().numpy()
    layers, heads = data.shape
    fig = Figure(figsize=(1.0 + 0.62 * heads, 1.2 + 0.48 * layers), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", aspect="auto")
    finite = data[np.isfinite(data)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(layers):
        for j in range(heads):
            v = data[i, j]
            text, color = ("×", "black") if not np.isfinite(v) else (f"{v:.2f}", "black" if v > middle else "white")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "attention-head importance (per-layer L2-normalised)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# ----------------------------------------------------------------------------------------------------
# End to end: model name + task -> files


def _load(model_name: str, spec):
    """A pretrained model (+ tokenizer); a directory saved after `prune_heads` is rebuilt with load_pruned."""
    from transformers import AutoConfig, AutoTokenizer

    from diffprune.models import load_model, resolve_model_path

    path = resolve_model_path(model_name)
    if Path(path).is_dir() and pruned_heads_of(AutoConfig.from_pretrained(path)):
        return load_pruned(path), AutoTokenizer.from_pretrained(path)
    from diffprune.tasks import task_kind

    kind = task_kind(spec)
    model, tokenizer, _ = load_model(model_name, auto_class=kind.auto_class, **kind.model_kwargs(spec))
    return model, tokenizer


def run_importance(model_name: str, task_spec, data_dir, output_dir, num_examples: int = 256,
                   batch_size: int = 32, max_length: int = 128, seed: int = 42) -> dict:
    """Compute head importance of `model_name` on `num_examples` training examples of a task and save it.

    `task_spec` is a TaskSpec or a GLUE task name. Writes importance.json, importance.safetensors and
    importance.png to `output_dir`; returns the JSON content plus the file paths. A model without a
    trained task head gets a freshly initialised one (seeded by `seed`), as in Prune-LoRA, where the
    importance is taken before finetuning. For a QA task the loss is the span loss over windows of
    `max_length` tokens that overlap by min(128, max_length // 2) tokens.
    """
    from torch.utils.data import DataLoader

    from diffprune.tasks import get_task, load_task_data, task_kind

    for name, value in (("num_examples", num_examples), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DiffpruneError(f"{name} must be a positive integer, got {value!r}")
    if Path(output_dir).expanduser().exists() and not Path(output_dir).expanduser().is_dir():
        raise DiffpruneError(f"--output {output_dir} is an existing file; give a folder for the importance files")
    spec = get_task(task_spec) if isinstance(task_spec, str) else task_spec
    data = load_task_data(spec, data_dir, max_train_samples=num_examples, max_eval_samples=1, seed=seed)
    torch.manual_seed(seed)
    model, tokenizer = _load(model_name, spec)
    get_arch(model)  # fail before tokenising when the architecture is unsupported
    kind = task_kind(spec)
    dataset = kind.train_features(data.train, tokenizer, spec, max_length, min(128, max_length // 2))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=kind.collator(tokenizer))
    start = time.perf_counter()
    sums, tokens = importance_sums(model, loader, progress=True)
    seconds = time.perf_counter() - start
    scores = _scores(model, sums, tokens, normalize=True)
    meta = {"model": model_name, "model_type": model.config.model_type, "task": spec.name,
            "num_examples": len(dataset), "batch_size": batch_size, "max_length": max_length, "seed": seed,
            "tokens": tokens, "seconds": round(seconds, 2), "normalize": "per-layer L2",
            "pruned_heads": {str(k): v for k, v in pruned_heads_of(model.config).items()}}
    result = HeadImportance(scores, meta)
    files = result.save(output_dir)
    files["png"] = plot_importance(result.scores, Path(output_dir).expanduser() / "importance.png",
                                   title=f"head importance: {model_name} on {spec.name}")
    return {**result.to_json(), "files": {k: str(v) for k, v in files.items()}}


__all__ = ["head_masks", "importance_sums", "head_importance", "HeadImportance", "save_importance",
           "load_importance", "plot_importance", "run_importance"]
