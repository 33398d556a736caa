"""`--group-by-length`: the Trainer's length-grouped sampler behind one flag, recorded with the run."""
from __future__ import annotations

import json

import datasets
import torch
from run_inputs import data_dir, train_args  # noqa: F401  (fixture)
from transformers import Trainer

from diffprune.cli import main
from diffprune.train.data import collator
from diffprune.train.pipeline import TrainConfig, training_args


def _mixed_lengths(n: int, seed: int) -> tuple[list[int], datasets.Dataset]:
    """n tokenized examples of 3 to 59 tokens, each carrying its index in `idx`."""
    lengths = torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return lengths, datasets.Dataset.from_dict({"input_ids": [[101] + [1000] * (k - 2) + [102] for k in lengths],
                                                "attention_mask": [[1] * k for k in lengths], "labels": [0] * n,
                                                "idx": list(range(n))})


def _padded_tokens(trainer) -> tuple[int, list[int]]:
    total, seen = 0, []
    for batch in trainer.get_train_dataloader():
        total += batch["input_ids"].numel()
        seen += batch["idx"].tolist()
    return total, seen


def test_grouped_batches_pad_less_and_cover_every_example(tmp_path, tiny_model_dir, minilm_tokenizer):
    lengths, ds = _mixed_lengths(256, seed=0)
    counts = {}
    for grouped in (False, True):
        cfg = TrainConfig(output_dir=str(tmp_path), batch_size=16, group_by_length=grouped)
        args = training_args(cfg, tmp_path / str(grouped), 1.0)
        assert args.train_sampling_strategy == ("group_by_length" if grouped else "random")
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=ds,
                          data_collator=collator(minilm_tokenizer))
        total, seen = _padded_tokens(trainer)
        assert sorted(seen) == list(range(len(lengths)))  # every example once per epoch
        counts[grouped] = total
    real = sum(lengths)
    assert counts[True] < counts[False]
    # random batches of 16 pad to about their longest input (~57 of lengths 3..59, mean 31); the sampler sorts
    # groups of 4 batches (256 // 64 = 4 groups here), so a batch spans about a quarter of the length range
    assert counts[False] > 1.6 * real and counts[True] < 1.3 * real


def test_train_records_it_and_resume_keeps_it(tmp_path, tiny_model_dir, data_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_dir, out, "--group-by-length")) == 0
    assert json.loads((out / "run_config.json").read_text())["group_by_length"] is True
    capsys.readouterr()
    assert main(train_args(tiny_model_dir, data_dir, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "group_by_length=True, not False" in err


def test_evaluation_keeps_the_datasets_order_when_training_groups_by_length(tmp_path, minilm_tokenizer):
    """transformers 5 applies the length-grouped sampler to evaluation too; predictions are matched to
    examples (and QA logits to window offsets) by position, so ours must evaluate in order."""
    from diffprune.train.trainer import PhaseTrainer

    lengths, ds = _mixed_lengths(300, seed=1)
    args = training_args(TrainConfig(output_dir=str(tmp_path), batch_size=16, eval_batch_size=16,
                                     group_by_length=True), tmp_path / "run", 1.0)
    order = {}
    for cls, kwargs in ((Trainer, {}), (PhaseTrainer, {"phase": None})):
        trainer = cls(model=torch.nn.Linear(1, 1), args=args, data_collator=collator(minilm_tokenizer), **kwargs)
        order[cls] = [i for batch in trainer.get_eval_dataloader(ds) for i in batch["idx"].tolist()]
    assert order[Trainer] != list(range(len(lengths)))  # the plain Trainer's evaluation reorders
    assert order[PhaseTrainer] == list(range(len(lengths)))
