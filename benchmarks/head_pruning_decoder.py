"""Head pruning on a decoder with grouped-query attention: what surgery removes, that it is exact, and the
speed it buys against what the removed multiply-adds allow.

    python benchmarks/head_pruning_decoder.py [--family llama|qwen2|mistral] [--fraction 0.5]
                                              [--batch 8] [--length 128] [--repeats 7] [--threads 1]

A decoder classifier of a realistic shape (hidden 512, 4 layers, 8 query heads sharing 4 key/value heads,
gated feed-forward 1376) is built from its config with random weights: no checkpoint is needed, and head
pruning's speed and exactness do not depend on what the weights learnt. Head importance (Michel et al.)
is computed on random tokens with random labels, so the choice of heads is arbitrary but goes through the
real path: `head_importance`, `select_heads_to_prune` with the key/value group size (a query head goes
only with its whole group), `prune_heads` (weight surgery).

Printed: parameters before and after; the largest difference between the pruned model's logits and the
unpruned model's with the same heads masked (surgery must equal masking); sequences/s of both (best of
`--repeats` alternating timings, as benchmarks/prune_lora.py does) and the MAC ceiling: the speed-up that
removing exactly the pruned heads' multiply-adds would give (q and o scale with query heads, k and v with
key/value heads, scores and weighted sum with query heads and length; the gated feed-forward block's three
projections stay).
"""
from __future__ import annotations

import argparse
import copy

import torch
import transformers

from prune_lora import throughput

FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def build(family: str, seed: int = 0):
    config = getattr(transformers, FAMILIES[family])(
        vocab_size=1000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=1376, max_position_embeddings=512, pad_token_id=0, num_labels=2)
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def mac_ceiling(config, pruned: dict, length: int) -> float:
    """Per-token multiply-adds of the attention and feed-forward blocks before / after removing the pruned
    query heads and their key/value groups."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d, inter, group = h // heads, config.intermediate_size, heads // kv

    def layer(q: int) -> float:
        return 2 * h * q * d + 2 * h * (q // group) * d + 2 * length * q * d + 3 * h * inter

    layers = config.num_hidden_layers
    before = layers * layer(heads)
    after = sum(layer(heads - len(pruned.get(i, ()))) for i in range(layers))
    return before / after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    p.add_argument("--fraction", type=float, default=0.5, help="share of query heads to prune (whole groups)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", type=int, default=2, help="batches per timing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from diffprune.heads import count_parameters, head_importance, head_masks, prune_heads
    from diffprune.heads.selection import select_heads_to_prune
    from diffprune.heads.surgery import group_size

    base = build(args.family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labelled = [{**batch, "labels": torch.randint(0, 2, (args.batch,), generator=g)} for _ in range(2)]
    scores = head_importance(base, labelled)
    chosen = select_heads_to_prune(scores, fraction=args.fraction, group=group_size(base))

    mask = torch.ones_like(scores)
    for layer, heads in chosen.items():
        mask[layer, heads] = 0.0
    with torch.no_grad(), head_masks(base, mask):
        masked = base(**batch).logits
    pruned = copy.deepcopy(base)
    before = count_parameters(pruned)
    prune_heads(pruned, chosen)
    after = count_parameters(pruned)
    with torch.no_grad():
        got = pruned(**batch).logits
    speed = throughput({"unpruned": base, "pruned": pruned}, batch, args.repeats, args.batches)

    cfg = base.config
    print(f"{args.family}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
          f"query heads / {cfg.num_key_value_heads} key-value heads, gated FFN {cfg.intermediate_size}; "
          f"pruned {sum(map(len, chosen.values()))} of {scores.numel()} query heads: {chosen}")
    print(f"parameters {before:,} -> {after:,} (-{before - after:,}, {100 * (before - after) / before:.1f}%)")
    print(f"max |pruned - masked| logits: {(got - masked).abs().max().item():.3g}")
    print(f"\n{torch.get_num_threads()} thread(s), batch {args.batch} x {args.length} tokens, eval, no_grad, best "
          f"of {args.repeats} alternating timings of {args.batches} batches:\n")
    print("| model | parameters | sequences/s | speed-up | MAC ceiling |")
    print("|---|---:|---:|---:|---:|")
    print(f"| unpruned | {before:,} | {speed['unpruned']:.1f} | 1.00x | |")
    print(f"| pruned | {after:,} | {speed['pruned']:.1f} | {speed['pruned'] / speed['unpruned']:.2f}x | "
          f"{mac_ceiling(cfg, chosen, args.length):.2f}x |")


if __name__ == "__main__":
    main()
