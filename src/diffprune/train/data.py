"""Tokenisation of task data (columns text_a, optional text_b, label) for the Trainer."""
from __future__ import annotations

import datasets
import torch

CHARS_PER_TOKEN = 64  # text kept per token of max_length before tokenizing


def encode_texts(tokenizer, max_length: int, texts_a: list, texts_b: list | None = None):
    """The tokenizer's encoding of texts (or text pairs), truncated to `max_length`, unpadded.

    A token is rarely more than a few characters, so cutting each text to 64 characters per kept token
    changes nothing, and a 20 MB line is not tokenized whole before truncation (gigabytes of memory).
    Training, evaluation and `diffprune serve` all encode through here, so a served input is encoded as
    evaluation encodes it.
    """
    limit = CHARS_PER_TOKEN * max_length
    texts = [[t[:limit] if t else t for t in column] for column in (texts_a, texts_b) if column is not None]
    return tokenizer(*texts, truncation=True, max_length=max_length)


def tokenize(dataset: datasets.Dataset, tokenizer, max_length: int, regression: bool) -> datasets.Dataset:
    """input_ids / attention_mask (/ token_type_ids) and `labels`; padding happens per batch."""
    pair = "text_b" in dataset.column_names

    def encode(batch):
        enc = encode_texts(tokenizer, max_length, batch["text_a"], batch["text_b"] if pair else None)
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


def right_padding_collator(tokenizer):
    """Pads every batch on the right, whatever the tokenizer's padding side.

    For tasks whose labels are token positions (QA's start/end): left padding (decoder tokenizers) would
    shift every position by the padding width. Input ids are padded with the pad token, masks and token
    types with 0; position labels are plain integers and need no padding.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key in ("input_ids", "attention_mask", "token_type_ids"):
                fill = pad_id if key == "input_ids" else 0
                out = torch.full((len(values), width), fill, dtype=torch.long)
                for i, v in enumerate(values):
                    out[i, :len(v)] = torch.as_tensor(v, dtype=torch.long)
                batch[key] = out
            else:
                batch[key] = torch.as_tensor([int(v) for v in values], dtype=torch.long)
        return batch

    return collate
