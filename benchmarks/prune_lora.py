"""Prune-LoRA on MiniLM: what head pruning buys at inference, and what each method trains and keeps.

    python benchmarks/prune_lora.py [--data-dir ../shared/data/glue] [--task rte] [--fraction 0.3]
                                    [--batch 32] [--length 128] [--repeats 5] [--batches 3] [--threads N]

1. Head importance (Michel et al.) on the first 256 training examples of the task, with a freshly
   initialised head (seed 0), exactly as `--method prune-lora` does in `prepare()`; the least important
   `--fraction` of the heads are removed by weight surgery.
2. Inference throughput (sequences/s) of the unpruned and the pruned model: eval mode, no_grad, batches
   of `--batch` random sequences of exactly `--length` tokens (no padding, so both models do the same
   work per token). The two models are timed alternately, `--repeats` times each, `--batches` batches
   per timing after a warm-up, and the best timing of each is kept, so that machine noise (a shared CPU)
   hits both alike and the best case is compared with the best case. The pruned model is what a merged
   prune-lora task model runs (LoRA folded in); the unpruned one is what full finetuning or merged LoRA runs.
3. Parameters in the model and trained, for full finetuning, LoRA (r 8 on q, k, v, o) and prune-lora (the
   same pruning, ranks 8 / 4 by block importance, LayerNorms trained), with the real method plug-ins.

Prints a Markdown table; ratios are against the unpruned model / full finetuning.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch


def mac_ceiling(config, pruned: dict, length: int) -> tuple[float, float]:
    """(share of the encoder's per-token multiply-adds that the pruned heads carried, the speed-up that
    removing exactly those would give). Per layer and token: q, k, v and the output projection take
    4·h·(kept heads)·d_head, scores and the weighted sum 2·length·(kept heads)·d_head, the feed-forward
    block 2·h·intermediate; the rest (norms, softmax, GELU, embeddings) is left out. An upper bound for
    the measured speed-up, up to the cost of softmax over the removed heads."""
    h, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    d_head = h // heads

    def layer(kept: int) -> float:
        return 4 * h * kept * d_head + 2 * length * kept * d_head + 2 * h * inter

    layers = config.num_hidden_layers
    before = layers * layer(heads)
    after = sum(layer(heads - len(pruned.get(i, pruned.get(str(i), ())))) for i in range(layers))
    return 1.0 - after / before, before / after


def timed(model, batch, batches: int) -> float:
    """Seconds for `batches` forward passes (no_grad)."""
    with torch.no_grad():
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(**batch)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def throughput(models: dict, batch: dict, repeats: int, batches: int) -> dict[str, float]:
    """Best-of-`repeats` sequences/s of each model, the models alternating within every repeat."""
    n = batch["input_ids"].shape[0]
    for model in models.values():  # warm-up (allocator, kernels)
        timed(model, batch, 1)
    best = {name: float("inf") for name in models}
    for r in range(repeats):
        names = list(models) if r % 2 == 0 else list(reversed(models))  # neither always goes first
        for name in names:
            best[name] = min(best[name], timed(models[name], batch, batches))
    return {name: n * batches / seconds for name, seconds in best.items()}


def trainable(method, phase: str = "finetune") -> int:
    spec = method.build_phase(phase)
    return sum(p.numel() for g in spec.groups for p in g.params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"))
    p.add_argument("--task", default="rte")
    p.add_argument("--fraction", type=float, default=0.3, help="share of heads to prune")
    p.add_argument("--importance-examples", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, default=3, help="batches per timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffprune.heads import count_parameters, prune_heads
    from diffprune.methods import get_method, make_config
    from diffprune.models import load_model
    from diffprune.tasks import get_task, load_task_data
    from diffprune.train.data import collator, tokenize

    spec = get_task(args.task)
    labels = list(spec.label_names)
    torch.manual_seed(0)
    base, tokenizer, head = load_model(args.model, len(labels), labels)
    data = load_task_data(spec, args.data_dir, max_train_samples=None, max_eval_samples=1, seed=42)
    train = tokenize(data.train, tokenizer, args.length, spec.is_regression)
    collate = collator(tokenizer)

    def method(name, **options):
        cls = get_method(name)
        return cls(make_config(cls, options), copy.deepcopy(base), head)

    # prune-lora: importance + pruning + rank-varied LoRA, through the method itself
    start = time.perf_counter()
    pl = method("prune-lora", prune_fraction=args.fraction, importance_examples=args.importance_examples)
    pl.prepare(train, collate)
    importance_s = time.perf_counter() - start
    n_pruned, n_heads = sum(map(len, pl.pruned.values())), pl.scores.numel()
    full, lora = method("full"), method("lora")

    # inference models: the base, and the base with the same heads removed (= a merged prune-lora model)
    pruned = copy.deepcopy(base)
    prune_heads(pruned, pl.pruned)
    models = {"unpruned": base.to(args.device).eval(), "pruned": pruned.to(args.device).eval()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (args.batch, args.length), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # sanity: the pruned model is a different, working model of the right shape
        assert models["pruned"](**batch).logits.shape == (args.batch, len(labels))
    speed = throughput(models, batch, args.repeats, args.batches)

    rows = [  # (method, params in the trained model, trainable, params at inference after merging)
        ("full", count_parameters(full.model), trainable(full), count_parameters(base)),
        ("lora", count_parameters(lora.model), trainable(lora), count_parameters(base)),
        ("prune-lora", count_parameters(pl.model), trainable(pl), count_parameters(pruned)),
    ]
    ref_total, ref_train = rows[0][1], rows[0][2]
    threads = torch.get_num_threads()

    print(f"model {args.model}, task {args.task}: importance on {min(args.importance_examples, len(train))} "
          f"training examples took {importance_s:.1f} s; pruned {n_pruned} of {n_heads} heads "
          f"({100 * n_pruned / n_heads:.1f}%): {pl.pruned}")
    print(f"prune-lora ranks: layers {pl.layout['high_rank_layers']} at r=8, the rest r=4 "
          f"(block importance {[round(x, 3) for x in pl.layout['block_importance']]})\n")
    print(f"Inference, {args.device} ({threads} threads), batch {args.batch} × {args.length} tokens, eval, "
          f"no_grad, best of {args.repeats} alternating timings of {args.batches} batches:\n")
    print("| model | parameters | sequences/s | speed-up |")
    print("|---|---:|---:|---:|")
    for name, model in models.items():
        print(f"| {name} | {count_parameters(model):,} | {speed[name]:.1f} | "
              f"{speed[name] / speed['unpruned']:.2f}x |")
    removed, ceiling = mac_ceiling(base.config, pl.pruned, args.length)
    print(f"\nThe pruned heads carried {100 * removed:.1f}% of the encoder's per-token multiply-adds at length "
          f"{args.length}: removing them can give at most ~{ceiling:.2f}x (benchmarks/prune_lora.py:mac_ceiling).")
    print("\nParameters (task head included):\n")
    print("| method | in the trained model | vs full | trainable | trainable % | at inference (merged) | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, total, train_n, infer in rows:
        print(f"| {name} | {total:,} | {total / ref_total:.3f} | {train_n:,} | {100 * train_n / ref_train:.3f}% | "
              f"{infer:,} | {infer / rows[0][3]:.3f} |")


if __name__ == "__main__":
    main()
