"""diffprune.archs: what it discovers on every tiny family, the task head from the model, and overrides.

Expected values are written out here from each family's modelling code (transformers 5.x), not derived
from archs itself.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_FAMILIES, make_tiny
from torch import nn

from diffprune.archs import describe, layer_group, task_head_names, two_stacks
from diffprune.errors import DiffpruneError

# family: (first layer's module name, layers, self-attention q (or fused qkv) and out relative to the
# layer, ffn output relative to the layer, query heads, key/value heads)
LAYOUT = {
    "bert": ("bert.encoder.layer.0", 2, "attention.self.query", "attention.output.dense", "output.dense", 4, 4),
    "roberta": ("roberta.encoder.layer.0", 2, "attention.self.query", "attention.output.dense", "output.dense", 4, 4),
    "distilbert": ("distilbert.transformer.layer.0", 2, "attention.q_lin", "attention.out_lin", "ffn.lin2", 4, 4),
    "gpt2": ("transformer.h.0", 2, "attn.c_attn", "attn.c_proj", "mlp.c_proj", 4, 4),
    "deberta-v2": ("deberta.encoder.layer.0", 2, "attention.self.query_proj", "attention.output.dense",
                   "output.dense", 4, 4),
    "roformer": ("roformer.encoder.layer.0", 2, "attention.self.query", "attention.output.dense", "output.dense", 4, 4),
    "modernbert": ("model.layers.0", 2, "attn.Wqkv", "attn.Wo", "mlp.Wo", 4, 4),
    "albert": ("albert.encoder.albert_layer_groups.0", 1, "albert_layers.0.attention.query",
               "albert_layers.0.attention.dense", "albert_layers.0.ffn_output", 4, 4),  # one shared layer
    "llama": ("model.layers.0", 2, "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", 4, 2),
    "qwen2": ("model.layers.0", 2, "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", 4, 2),
    "bart": ("model.encoder.layers.0", 4, "self_attn.q_proj", "self_attn.out_proj", "fc2", 4, 4),
    "t5": ("transformer.encoder.block.0", 4, "layer.0.SelfAttention.q", "layer.0.SelfAttention.o",
           "layer.1.DenseReluDense.wo", 4, 4),
}
# the modules each task class adds around its base model
HEAD = {"bert": {"classifier"}, "roberta": {"classifier.dense", "classifier.out_proj"},
        "distilbert": {"pre_classifier", "classifier"}, "gpt2": {"score"},
        "deberta-v2": {"pooler.dense", "classifier"}, "roformer": {"classifier.dense", "classifier.out_proj"},
        "modernbert": {"head.dense", "head.norm", "classifier"}, "albert": {"classifier"},
        "llama": {"score"}, "qwen2": {"score"},
        "bart": {"classification_head.dense", "classification_head.out_proj"},
        "t5": {"classification_head.dense", "classification_head.out_proj"}}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_discovered_layout(family):
    first, n_layers, q, out, ffn, heads, kv = LAYOUT[family]
    arch = describe(make_tiny(family))
    assert len(arch.layers) == n_layers
    layer = arch.layers[0]
    assert layer.name == first
    attn = layer.attention
    assert (attn.qkv or attn.q) == f"{first}.{q}"
    assert attn.out == f"{first}.{out}"
    assert layer.ffn_out == f"{first}.{ffn}"
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (heads, kv, 8)
    if n_layers == 4:  # encoder-decoder: two stacks, numbered apart; decoder layers have cross-attention
        assert [(la.stack, la.index) for la in arch.layers] == [("encoder", 0), ("encoder", 1),
                                                              ("decoder", 0), ("decoder", 1)]
        assert [len(la.cross_attention) for la in arch.layers] == [0, 0, 1, 1]
        assert arch.layers[2].group == "decoder.layer.0"
    else:
        assert [la.group for la in arch.layers] == ["layer.0", "layer.1"][:n_layers]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_task_head_is_the_task_class_modules(family):
    model = make_tiny(family)
    assert {n.rpartition(".")[0] for n in task_head_names(model)} == HEAD[family]
    assert task_head_names(model.base_model) == []  # a bare base model has no head


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "llama", "bart", "t5"])
def test_load_model_finds_the_head(family, tmp_path):
    """A checkpoint without a head: the head is what it lacked. One that has it: the class's head module."""
    from diffprune.models import load_model

    model = make_tiny(family)
    want = sorted(task_head_names(model))
    model.base_model.save_pretrained(tmp_path / "base")
    _, _, head = load_model(str(tmp_path / "base"), 2, ["a", "b"], tokenizer=False)
    assert sorted(head) == want  # the loading report's missing keys
    model.save_pretrained(tmp_path / "with-head")
    _, _, head = load_model(str(tmp_path / "with-head"), 2, ["a", "b"], tokenizer=False)
    assert sorted(head) == want  # nothing missing: the class's own head, not a name list


def test_layer_groups_from_names():
    t5 = ["transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight",
          "transformer.decoder.block.1.layer.0.SelfAttention.q.weight"]
    assert two_stacks(t5)
    assert [layer_group(n, True) for n in t5] == ["encoder.layer.0", "decoder.layer.1"]
    assert layer_group("model.decoder.layers.1.fc2.weight") == "decoder.layer.1"
    assert layer_group("classification_head.dense.weight") == "head"
    assert layer_group("transformer.shared.weight") == "embeddings"
    assert layer_group("bert.encoder.layer.11.output.dense.weight") == "layer.11"
    assert not two_stacks(["bert.encoder.layer.0.output.dense.weight"])


# ------------------------------------------------------------------------------------------- overrides

class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        return self.wo(self.wv(x))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _Attn()
        self.ff1, self.ff2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.ff2(self.ff1(x + self.mix(x)))


class _Odd(nn.Module):
    """q/k/v named wq/wk/wv: no name transformers uses, so discovery cannot find the attention."""
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "oddity", "hidden_size": 8, "num_attention_heads": 2})()
        self.blocks = nn.ModuleList([_Layer(), _Layer()])


def test_undiscoverable_attention_says_how_to_override(tmp_path, monkeypatch):
    with pytest.raises(DiffpruneError, match=r"oddity: found 2 transformer layers but no attention block.*"
                                             r"OVERRIDES.*DIFFPRUNE_ARCH"):
        describe(_Odd())
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"oddity": {"attention": "mix", "q": "wq", "k": "wk", "v": "wv", "out": "mix.wo"}}))
    monkeypatch.setenv("DIFFPRUNE_ARCH", str(path))
    arch = describe(_Odd())
    attn = arch.layers[1].attention
    assert (attn.q, attn.out, attn.num_heads, attn.head_dim) == ("blocks.1.mix.wq", "blocks.1.mix.wo", 2, 4)
    assert arch.layers[1].ffn_out == "blocks.1.ff2"
    path.write_text("{not json")
    with pytest.raises(DiffpruneError, match="DIFFPRUNE_ARCH.*not a readable JSON file"):
        describe(_Odd())


def test_lora_on_a_discovered_family_adapts_exactly_q_k_v_o():
    """Llama (GQA): default targets are q, k, v, o of both layers and nothing in the MLP."""
    from diffprune.methods import get_method, make_config

    model = make_tiny("llama")
    cls = get_method("lora")
    cls(make_config(cls, {}), model, task_head_names(model))
    adapted = sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "o_proj", "q_proj",
                                                                                      "v_proj")]
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_stats_keep_encoder_and_decoder_layers_apart():
    """`inspect`'s per-layer numbers of a BART diff: encoder and decoder layers apart, the head as head."""
    from diffprune.methods import get_method, make_config
    from diffprune.storage import diff_stats

    model = make_tiny("bart")
    cls = get_method("last-layer")
    diff = cls(make_config(cls, {}), model, task_head_names(model)).export()
    groups = diff_stats(diff)["dense_params_by_layer"]
    assert list(groups) == ["decoder.layer.1", "head"]  # last-layer: exactly one layer, the decoder's top
    cls = get_method("full")
    groups = diff_stats(cls(make_config(cls, {}), model, task_head_names(model)).export())["dense_params_by_layer"]
    assert list(groups)[:5] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "decoder.layer.0",
                                "decoder.layer.1"]
    assert list(groups)[-1] == "head"


@pytest.mark.parametrize("method", ["diff-pruning", "lora"])
def test_encoder_decoder_trains_and_evaluates_end_to_end(method, tmp_path, minilm_tokenizer):
    """The issue's crash: a BART classifier through the whole pipeline (train, evaluate, store, reload)."""
    from conftest import VOCAB, assert_eval_reproduces

    from diffprune.api import load_task_model, train
    from diffprune.tasks import demo_task, write_demo_data

    model = make_tiny("bart", vocab_size=VOCAB)
    model.config.eos_token_id = minilm_tokenizer.sep_token_id  # BART classifies at the final [SEP]
    model.config.pad_token_id = minilm_tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "bart")
    minilm_tokenizer.save_pretrained(tmp_path / "bart")
    spec = demo_task(write_demo_data(tmp_path / "data"))
    out = tmp_path / "run"
    options = {"sparsity": 0.05, "l0_epochs": 1.0} if method == "diff-pruning" else {}
    metrics = train(str(out), model=str(tmp_path / "bart"), method=method, spec=spec, max_train_samples=32,
                    max_eval_samples=40, batch_size=16, max_length=16, epochs=1, progress=False, **options)
    assert "accuracy" in next(iter(metrics["final"].values()))
    loaded, tokenizer, diff = load_task_model(out)
    head = set(task_head_names(loaded))
    assert head <= set(diff.dense) and not head & set(diff.sparse)  # the head is stored whole, never sparse
    assert_eval_reproduces(loaded, tokenizer, spec, out, tmp_path / "e")
