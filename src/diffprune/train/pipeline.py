"""The training recipe: data → model → method phases on the Trainer → evaluation → stored task diff.

One pipeline serves every method. For each phase it trains (checkpointing as it goes), lets the method
make its transition (Diff Pruning projects δ here), evaluates on every dev split, and writes a snapshot
of the task state. With `resume=True`, finished phases are restored from their snapshots and an
unfinished one continues from its last checkpoint, so a stopped run loses at most `save_steps` steps.

Output directory layout:
    OUT/diff/                 the task diff (diff_config.json + diff.safetensors), see `diffprune.storage`;
                              sparse values in `diff_dtype` (default half precision), phase snapshots float32
    OUT/metrics.json          dev metrics after each phase, the final ones (of the stored diff) under "final"
    OUT/log.jsonl             every training log record (loss, task loss, penalty, expected L0, …)
    OUT/run_config.json       the full configuration of the run
    OUT/predictions.json      QA only: the final model's answer per dev question (id -> text, official format)
    OUT/phases/<phase>/       per-phase snapshot, metrics and (while running) Trainer checkpoints
"""
from __future__ import annotations

import gc
import math
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainingArguments

from ..errors import DiffpruneError
from ..io import atomic_save_tensors, atomic_write_json
from ..methods import get_method, make_config
from ..methods.sparse import FixedMaskMixin
from ..models import load_model, resolve_model_path
from ..storage import TaskDiff, load_diff, save_diff
from ..storage.codec import as_stored, check_value_dtype, default_value_dtype
from ..tasks import EvalSplit, TaskSpec, compute_metrics, get_task, task_kind
from .rundir import RunLock, check_output_dir, newest_complete_checkpoint, prepare_output_dir
from .trainer import JsonlLogger, PhaseTrainer

log = logging.getLogger("diffprune")


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI fills it from flags."""
    output_dir: str
    task: str = "rte"
    model: str = "minilm"
    method: str = "diff-pruning"
    method_options: dict[str, Any] = field(default_factory=dict)  # fields of the method's config
    data_dir: str | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_length: int = 128
    doc_stride: int = 128        # QA: tokens shared by neighbouring windows of a long context (0: no windows)
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    warmup: float = 0.0          # share of each phase's steps spent warming the learning rate up
    group_by_length: bool = False  # batches of similar lengths (the Trainer's length-grouped sampler): less padding
    max_grad_norm: float = 1.0
    logging_steps: int = 20
    save_steps: int = 200
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    diff_dtype: str | None = None  # sparse values of OUT/diff; None: codec.default_value_dtype(base model)

    def __post_init__(self):
        if self.diff_dtype is not None:
            check_value_dtype(self.diff_dtype)
        for key in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            if getattr(self, key) <= 0:
                raise DiffpruneError(f"{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.doc_stride < 0:
            raise DiffpruneError(f"--doc-stride must be 0 or more, got {self.doc_stride}")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise DiffpruneError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if not 0.0 <= self.warmup < 1.0:
            raise DiffpruneError(f"--warmup is a share of the steps in [0, 1), got {self.warmup}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise DiffpruneError(f"max-grad-norm must be a finite number >= 0, got {self.max_grad_norm}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def training_args(cfg: TrainConfig, phase_dir: Path, epochs: float,
                  label_names: tuple[str, ...] = ("labels",)) -> TrainingArguments:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(phase_dir / "checkpoints"), num_train_epochs=epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=1, eval_strategy="no", report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False, label_names=list(label_names),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        disable_tqdm=not cfg.progress, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=("gloo" if distributed and not torch.cuda.is_available() else None),
        ddp_find_unused_parameters=False,
    )


def evaluate(model, evals: dict, spec: TaskSpec, cfg: TrainConfig, tokenizer, phase_dir: Path) -> dict:
    """Dev metrics for every eval split: {split: {metric: value}}.

    `evals` maps a split to an `EvalSplit` (the task kind's tokenized split and scorer; what the scorer
    leaves in its `outputs`, e.g. QA predictions, is for the caller to write) or, for classification, to a
    tokenized dataset.
    """
    kind = task_kind(spec)
    evals = {k: v if isinstance(v, EvalSplit) else
             EvalSplit(v, lambda p, l: compute_metrics(spec, p, l)) for k, v in evals.items()}
    current: list[EvalSplit] = []

    def metric_fn(pred):
        return current[-1].score(pred.predictions, pred.label_ids)

    args = training_args(cfg, phase_dir, 1.0, kind.label_keys)
    trainer = PhaseTrainer(model=model, args=args, data_collator=kind.collator(tokenizer), compute_metrics=metric_fn,
                           phase=None)
    trainer.remove_callback(PrinterCallback)  # results are returned (and printed by the caller), not logged
    out = {}
    for split, evaluation in evals.items():
        current.append(evaluation)
        result = trainer.evaluate(eval_dataset=evaluation.dataset, metric_key_prefix=split)
        out[split] = {k[len(split) + 1:]: v for k, v in result.items() if k.startswith(split + "_")
                      if not k.endswith(("_runtime", "_per_second", "_preparation_time"))}
    return out


def eval_outputs(evals: dict) -> dict[str, Any]:
    """The files the scorers of `evals` left ({file name: JSON object}); a split other than "dev" (or the
    only one) gets its name in the file name: predictions_dev_matched.json."""
    files = {}
    for split, evaluation in evals.items():
        for name, value in getattr(evaluation, "outputs", {}).items():
            stem, dot, ext = name.rpartition(".")
            files[name if split == "dev" or len(evals) == 1 else f"{stem}_{split}{dot}{ext}"] = value
    return files


def run(cfg: TrainConfig, spec: TaskSpec | None = None) -> dict:
    """Train `cfg.method` on the task and write everything under `cfg.output_dir`; returns metrics.json."""
    lock = RunLock(Path(cfg.output_dir))
    try:
        return _run(cfg, spec, lock)
    finally:
        lock.release()


def max_positions(config) -> int | None:
    """The longest input (in tokens) the model's position embeddings allow, if the config says."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    if config.model_type in OFFSET_POSITIONS:  # positions start after the padding index
        limit -= (config.pad_token_id or 0) + 1
    return limit


OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
                    "longformer", "mpnet", "ibert", "luke"}


def _run(cfg: TrainConfig, spec: TaskSpec | None, lock: RunLock) -> dict:
    out = Path(cfg.output_dir)
    main = is_main_process()
    spec = spec or get_task(cfg.task)
    data_files = {"train": spec.train_file, **spec.eval_files}
    if main:
        check_output_dir(out, cfg, lock, resolve_model_path(cfg.model), data_files)
    method_cls = get_method(cfg.method)
    method_cfg = make_config(method_cls, cfg.method_options)  # validates before anything slow happens
    torch.manual_seed(cfg.seed)

    kind = task_kind(spec)
    data = kind.load(spec, cfg.data_dir, cfg.max_train_samples, cfg.max_eval_samples, cfg.seed)
    model, tokenizer, head = load_model(cfg.model, auto_class=kind.auto_class, **kind.model_kwargs(spec))
    limit = max_positions(model.config)
    if limit is not None and cfg.max_length > limit:
        raise DiffpruneError(f"--max-length {cfg.max_length} is beyond the {limit} positions of model "
                             f"'{cfg.model}'; use --max-length {limit} or less")
    base_params = sum(p.numel() for n, p in model.named_parameters() if n not in set(head))
    method = method_cls(method_cfg, model, head)  # checks --include/--exclude against the model
    # tokenized before anything is written: a context that fits no window is a mistake of the input
    train_ds = kind.train_features(data.train, tokenizer, spec, cfg.max_length, cfg.doc_stride)
    evals = {k: kind.eval_split(v, tokenizer, spec, cfg.max_length, cfg.doc_stride) for k, v in data.evals.items()}
    if main:  # only now, so a mistake above leaves nothing behind
        prepare_output_dir(out, cfg, lock, data_files)
    collate = kind.collator(tokenizer)
    method.prepare(train_ds, collate)
    base_fingerprint_model = model  # sparse methods hold θ unchanged whenever a snapshot is saved

    def evaluate_phase(train_stats: dict, phase_dir: Path) -> dict:
        """Dev metrics of the phase just finished (or restored), written as its metrics.json."""
        phase_metrics = evaluate(method.eval_model(), evals, spec, cfg, tokenizer, phase_dir)
        phase_metrics["train"] = train_stats
        if main:
            for name, value in eval_outputs(evals).items():  # QA's predictions.json, before the metrics
                atomic_write_json(phase_dir / name, value)
            atomic_write_json(phase_dir / "metrics.json", phase_metrics)
            shutil.rmtree(phase_dir / "checkpoints", ignore_errors=True)
        return phase_metrics

    metrics: dict[str, Any] = {"task": spec.name, "method": cfg.method, "model": cfg.model, "phases": {}}
    for phase in method.phases:
        phase_dir = out / "phases" / phase
        done, train_file = phase_dir / "metrics.json", phase_dir / "train.json"
        if cfg.resume and (phase_dir / "snapshot").exists() and (done.exists() or train_file.exists()):
            method.restore(load_diff(phase_dir / "snapshot"))
            if done.exists():
                metrics["phases"][phase] = json.loads(done.read_text())
                log.info("phase %s: restored from its snapshot", phase)
                continue
            # trained and saved, but stopped in its evaluation: evaluate again, nothing to retrain
            metrics["phases"][phase] = evaluate_phase(json.loads(train_file.read_text()), phase_dir)
            continue
        spec_phase = method.build_phase(phase)
        trainer = PhaseTrainer(model=spec_phase.model,
                               args=training_args(cfg, phase_dir, spec_phase.epochs, kind.label_keys),
                               train_dataset=train_ds, data_collator=collate,
                               callbacks=[JsonlLogger(out / "log.jsonl", phase)], phase=spec_phase,
                               warmup_fraction=cfg.warmup)
        checkpoint = newest_complete_checkpoint(phase_dir / "checkpoints", remove=main) if cfg.resume else None
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - start
        method.end_phase(phase)
        train_stats = {"seconds": round(seconds, 2), "steps": result.global_step,
                       "seconds_per_step": round(seconds / max(1, result.global_step), 4),
                       "train_loss": result.training_loss, "peak_rss_mb": round(peak_rss_mb(), 1),
                       **method.phase_stats.get(phase, {})}
        if main:  # saved before evaluating, so that a failure in evaluation never loses the trained phase
            for name, tensors in method.saved_files.pop(phase, {}).items():
                atomic_save_tensors(tensors, phase_dir / name)
            atomic_write_json(train_file, train_stats)
            save_diff(finish_diff(method.export(), cfg, spec, base_params), phase_dir / "snapshot",
                      base_fingerprint_model)
        metrics["phases"][phase] = evaluate_phase(train_stats, phase_dir)
        # Free the finished phase (its optimizer state; for Diff Pruning w, α and their Adam moments, 6·d
        # floats) before the next one starts, rather than whenever the Trainer's reference cycles are swept.
        del trainer, spec_phase
        gc.collect()

    last_phase = method.phases[-1]
    last = out / "phases" / last_phase / "snapshot"
    value_dtype = cfg.diff_dtype or default_value_dtype(model)
    final = metrics["phases"][last_phase]
    # only the sparse methods store sparse values (the others' export would copy every trained tensor for nothing)
    rounded = stored_form(method.export(), value_dtype) if isinstance(method, FixedMaskMixin) else None
    final_outputs = None  # None: the last phase's own files (QA predictions) are the final ones
    if rounded is not None:  # the stored values differ from the trained float32 ones: evaluate what is stored
        method.restore(rounded)
        final = evaluate(method.eval_model(), evals, spec, cfg, tokenizer, out / "phases" / last_phase)
        final_outputs = eval_outputs(evals)
        shutil.rmtree(out / "phases" / last_phase / "checkpoints", ignore_errors=True)
        metrics["final_float32"] = {k: v for k, v in metrics["phases"][last_phase].items() if k != "train"}
    if main:
        save_diff(load_diff(last), out / "diff", None, value_dtype=value_dtype)
        from ..storage import diff_stats

        stats = diff_stats(load_diff(out / "diff"), out / "diff")
        if final_outputs is not None:  # QA: the predictions of the stored diff, next to its metrics
            for name, value in final_outputs.items():
                atomic_write_json(out / name, value)
        else:
            for file in sorted((out / "phases" / last_phase).glob("predictions*.json")):
                shutil.copyfile(file, out / f".{file.name}.tmp")
                os.replace(out / f".{file.name}.tmp", out / file.name)
        metrics["final"] = {split: vals for split, vals in final.items() if split != "train"}
        metrics["main_metric"] = spec.main_metric
        metrics["storage"] = {k: stats[k] for k in ("nnz", "num_diff_params", "sparsity", "stored_bytes",
                                                    "sparse_bytes_per_nnz", "dense_params", "task_params",
                                                    "task_params_pct", "value_dtype") if k in stats}
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def stored_form(diff: TaskDiff, value_dtype: str) -> TaskDiff | None:
    """`diff` with its sparse values as saving in `value_dtype` and loading give them back, or None when
    that changes nothing (float32, no sparse entries, values a half type holds exactly).

    Computed in memory on every process, so that a distributed run evaluates the stored diff in step."""
    changed = False
    for delta in diff.sparse.values():
        values = as_stored(delta.values, value_dtype)
        changed = changed or not torch.equal(values, delta.values.float())
        delta.values = values
    return diff if changed else None


def finish_diff(diff: TaskDiff, cfg: TrainConfig, spec: TaskSpec, base_params: int | None = None) -> TaskDiff:
    diff.base_model, diff.task = cfg.model, spec.name
    if base_params is not None:  # pretrained parameters (task head excluded), for "% of the base" figures
        diff.extra["base_params"] = int(base_params)
    diff.label_names = list(spec.label_names) if spec.label_names else None
    diff.extra.setdefault("num_labels", spec.num_labels)
    diff.extra["max_length"] = cfg.max_length
    diff.extra["task_kind"] = spec.kind
    if spec.kind == "qa":
        diff.extra["doc_stride"] = cfg.doc_stride
    return diff


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
