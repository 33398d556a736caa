"""Tokenisation of task data (columns text_a, optional text_b, label) for the Trainer."""
from __future__ import annotations

import datasets
import torch

CHARS_PER_TOKEN = 64  # text kept per token of max_length before tokenizing


def tokenize(dataset: datasets.Dataset, tokenizer, max_length: int, regression: bool) -> datasets.Dataset:
    """input_ids / attention_mask (/ token_type_ids) and `labels`; padding happens per batch."""
    pair = "text_b" in dataset.column_names
    limit = CHARS_PER_TOKEN * max_length

    def encode(batch):
        # A token is rarely more than a few characters, so cutting each text to 64 characters per kept token
        # changes nothing, and a 20 MB line is not tokenized whole before truncation (gigabytes of memory).
        texts = tuple([t[:limit] if t else t for t in batch[c]] for c in (("text_a", "text_b") if pair else ("text_a",)))
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = [float(x) for x in batch["label"]] if regression else [int(x) for x in batch["label"]]
        return enc

    out = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing",
                      load_from_cache_file=False, keep_in_memory=True)
    out.set_format("torch")
    return out


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    base = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch = base(features)
        if batch["labels"].dtype == torch.float64:
            batch["labels"] = batch["labels"].float()
        return batch

    return collate
