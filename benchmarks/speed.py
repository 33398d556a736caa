"""Time per training step and peak memory: full finetuning vs Diff Pruning's L0 and fixed-mask phases.

    python benchmarks/speed.py [--model minilm] [--batch 32] [--length 64] [--steps 8] [--rounds 2]
    python benchmarks/speed.py --modes full,bitfit,lora,adapter-houlsby,lt-sft:fixed_mask   # any methods

Each configuration runs in its own process (so peak memory is its own), with the real method plug-ins
and the same fused AdamW the trainer uses; rounds alternate the configurations so that machine noise
hits all of them alike, and the best round of each is kept. Printed as ratios to full finetuning, with
the median over rounds of each round's own ratio next to it (on a noisy machine the two can differ).
Memory is the process's peak resident set (ru_maxrss): "peak" is absolute, "train" is the growth over
the process's footprint after the model was loaded, i.e. what training itself adds.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("full", "l0", "l0-structured", "fixed_mask")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(mode: str, model_name: str, batch: int, length: int, steps: int) -> dict:
    """Time `steps` training steps of one method phase. `mode` is a method name (its first phase), or
    METHOD:PHASE (earlier phases are set up and ended without training), or one of the Diff Pruning
    shorthands l0, l0-structured, fixed_mask."""
    import torch

    from diffprune.methods import get_method, make_config
    from diffprune.models import load_model
    from diffprune.train.trainer import make_adamw

    torch.manual_seed(0)
    model, _, head = load_model(model_name, 2, ["0", "1"], tokenizer=False)
    shorthand = {"l0": ("diff-pruning", "l0", {}), "l0-structured": ("diff-pruning", "l0", {"structured": True}),
                 "fixed_mask": ("diff-pruning", "fixed_mask", {})}
    name, _, phase = mode.partition(":")
    name, phase, options = shorthand.get(mode, (name, phase, {}))
    cls = get_method(name)
    method = cls(make_config(cls, options), model, head)
    ids = torch.randint(1000, model.config.vocab_size, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))}
    examples = [{k: v[i] for k, v in inputs.items()} for i in range(batch)]
    method.prepare(examples, lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    phase = phase or method.phases[0]
    for earlier in method.phases[: method.phases.index(phase)]:
        spec = method.build_phase(earlier)
        source = getattr(spec.model, "source", None)
        if source is not None and hasattr(source, "w"):  # give the projection something to choose from
            with torch.no_grad():
                source.w.normal_()
        method.end_phase(earlier)
        del spec, source  # the earlier phase's diff (w and α for Diff Pruning) is not part of this one
    gc.collect()
    spec = method.build_phase(phase)
    module = spec.model.train()
    opt = make_adamw([{"params": g.params, "lr": g.lr, "weight_decay": 0.0, "eps": g.eps} for g in spec.groups])
    base_rss = rss_mb()

    def step():
        loss = module(**inputs).loss
        if spec.penalty is not None:
            loss = loss + spec.penalty(1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in spec.groups for p in g.params], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - start) / steps
    return {"mode": mode, "seconds_per_step": per_step, "peak_rss_mb": rss_mb(), "base_rss_mb": base_rss,
            "train_rss_mb": rss_mb() - base_rss, "trainable": sum(p.numel() for g in spec.groups for p in g.params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.length, args.steps)))
        return
    modes = args.modes.split(",")
    best: dict[str, dict] = {}
    rounds: list[dict[str, float]] = []  # s/step per mode, per round: for the paired median ratio
    for r in range(args.rounds):
        rounds.append({})
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--batch", str(args.batch),
                   "--length", str(args.length), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rounds[-1][mode] = res["seconds_per_step"]
            print(f"round {r + 1} {mode:<14} {res['seconds_per_step']:.3f} s/step  peak {res['peak_rss_mb']:.0f} MiB",
                  file=sys.stderr, flush=True)
            if mode not in best or res["seconds_per_step"] < best[mode]["seconds_per_step"]:
                best[mode] = {**res, "peak_rss_mb": min(res["peak_rss_mb"], best.get(mode, res)["peak_rss_mb"])}
    ref = best.get("full")
    print(f"\n{args.model}, batch {args.batch}, length {args.length}, {args.steps} timed steps, best of {args.rounds}"
          " rounds; 'median' is the median over rounds of the ratio to full finetuning in the same round\n")
    print("| phase | trainable | s/step | time vs full | median | peak RSS MiB | peak vs full | training RSS MiB | "
          "training vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        b = best[mode]
        rt = b["seconds_per_step"] / ref["seconds_per_step"] if ref else float("nan")
        paired = sorted(r[mode] / r["full"] for r in rounds) if ref else [float("nan")]
        med = statistics.median(paired)
        rm = b["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        rtr = b["train_rss_mb"] / ref["train_rss_mb"] if ref else float("nan")
        print(f"| {mode} | {b['trainable']:,} | {b['seconds_per_step']:.3f} | {rt:.2f}x | {med:.2f}x | "
              f"{b['peak_rss_mb']:.0f} | "
              f"{rm:.2f}x | {b['train_rss_mb']:.0f} | {rtr:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best": best, "rounds": rounds}, f, indent=2)


if __name__ == "__main__":
    main()
