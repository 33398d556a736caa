"""Prune-LoRA and head-pruning in detail on tiny BERT / RoBERTa / DistilBERT (tests/test_contract.py runs them on
every other family).

What is checked independently of the implementation: the number and identity of the pruned heads (the
lowest scores), which layers get the high LoRA rank (top-k by the summed importance of their remaining
heads, recomputed here from the stored scores), and the trainable-parameter count from the definition
(r·(in + out) per adapted Linear with the *pruned* widths, plus LayerNorms and the head). Then: training
lowers the loss, export → save → load → fresh base → attach + apply gives identical logits, `prepare` is
deterministic, and an end-to-end `diffprune.api.train` run reloads to the same dev metrics.
"""
import re

import pytest
import torch

from conftest import make_tiny, random_batch, phase_steps, crash_at_step, assert_eval_reproduces
from diffprune.errors import DiffpruneError
from diffprune.heads import load_pruned, pruned_heads_of
from diffprune.methods import get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

ARCHS = ("bert", "roberta", "distilbert")
LABELS = torch.tensor([0, 1, 1])


# ------------------------------------------------------------------------------------------------ helpers

def dims(model):
    """(hidden, layers, heads per layer, labels) from the transformers config."""
    c = model.config
    if c.model_type == "distilbert":
        return c.dim, c.n_layers, c.n_heads, c.num_labels
    return c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_labels


def make_model(arch, layers=2, seed=0):
    """make_tiny's model, optionally deeper (so that "top k of the layers" is not trivially 1 of 2)."""
    model = make_tiny(arch, seed=seed)
    if layers == 2:
        return model
    cfg = model.config
    setattr(cfg, "n_layers" if arch == "distilbert" else "num_hidden_layers", layers)
    torch.manual_seed(seed)
    return type(model)(cfg).eval()


def toy_data(model, n=24, seed=5):
    """A list of examples of varying length with labels, and a padding collate (attention mask 0 on pads)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        length = 4 + i % 5
        ids = torch.randint(2, model.config.vocab_size, (length,), generator=g)
        data.append({"input_ids": ids, "labels": torch.tensor(int(torch.randint(0, 2, (1,), generator=g)))})

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, x in enumerate(items):
            ids[row, :len(x["input_ids"])] = x["input_ids"]
            mask[row, :len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([x["labels"] for x in items])}

    return data, collate


def build(name, arch, layers=2, seed=0, **options):
    model = make_model(arch, layers, seed)
    head = head_names_by_convention(model)
    cls = get_method(name)
    method = cls(make_config(cls, {"importance_batch_size": 8, **options}), model, head)
    method.prepare(*toy_data(model))
    return method, model, head


def n_trainable(spec):
    params = [p for g in spec.groups for p in g.params]
    assert len({id(p) for p in params}) == len(params), "a parameter sits in two groups"
    assert sum(p.requires_grad for p in spec.model.parameters()) == len(params), "a trained tensor has no group"
    return sum(p.numel() for p in params)


def head_params(model):
    h, _, _, c = dims(model)
    out = h * c + c
    if model.config.model_type in ("roberta", "distilbert"):  # dense h → h before the classifier
        out += h * h + h
    return out


def expected_lora(model, pruned, ranks):
    """Σ r·(in + out) over q, k, v (h → kept·d) and o (kept·d → h) of the layers that kept a head."""
    h, layers, heads, _ = dims(model)
    d = h // heads
    total = 0
    for layer in range(layers):
        kept = (heads - len(pruned.get(layer, []))) * d
        if kept:
            total += ranks[layer] * (3 * (h + kept) + (kept + h))
    return total


def expected_layernorms(model):
    h, layers, _, _ = dims(model)
    return 2 * h * (1 + 2 * layers)  # embeddings + 2 per layer, weight and bias


def lora_ranks_by_layer(model):
    """{layer: set of A ranks} read from the injected modules."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("lora_A.default.weight"):
            layer = int(re.search(r"layer\.(\d+)\.", name).group(1))
            out.setdefault(layer, set()).add(p.shape[0])
    return out


def steps(spec, batch, n=15, lr=1e-2):
    return phase_steps(spec, batch, LABELS, n, lr)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread; on a shared, loaded CPU several threads make each
    backward pass ~50x slower (spin-waiting). Restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ pruning

@pytest.mark.parametrize("options, count", [({"prune_count": 3}, 3), ({}, 2), ({"prune_fraction": 0.5}, 4)],
                         ids=["count3", "default-fraction0.3", "fraction0.5"])
def test_pruned_heads_are_the_requested_number_of_lowest_scores(arch, options, count):
    method, model, _ = build("prune-lora", arch, **options)
    scores = method.scores
    assert scores.shape == (2, 4) and not torch.isnan(scores).any()
    pruned = pruned_heads_of(model.config)
    assert pruned == method.pruned
    assert sum(map(len, pruned.values())) == count  # default: round(0.3 · 8) = 2
    flat = scores.flatten().tolist()
    lowest = sorted(range(8), key=lambda i: (flat[i], i))[:count]
    assert {(i // 4, i % 4) for i in lowest} == {(l, h) for l, hs in pruned.items() for h in hs}
    h, _, heads, _ = dims(model)
    for layer in range(2):  # the surgery really shrank the query projection
        kept = heads - len(pruned.get(layer, []))
        if not kept:
            continue
        name = next(n for n in method.layout["lora_targets"] if re.search(rf"layer\.{layer}\..*(query|q_lin)$", n))
        assert model.get_submodule(name).get_base_layer().out_features == kept * (h // heads)


def test_threshold_prunes_every_head_below_it():
    method, model, _ = build("prune-lora", "bert", prune_threshold=0.45)
    want = {(l, h) for l in range(2) for h in range(4) if method.scores[l, h] < 0.45}
    assert {(l, h) for l, hs in method.pruned.items() for h in hs} == want


def test_rank_pattern_gives_r_high_to_the_top_blocks(arch):
    method, model, head = build("prune-lora", arch, layers=6, prune_count=7)
    c = method.config
    assert (c.r_high, c.r_low, c.top_blocks) == (8, 4, None)
    # block importance recomputed from the scores: sum over the heads that survived the pruning
    scores, pruned = method.scores.tolist(), pruned_heads_of(model.config)
    block = [sum(s for j, s in enumerate(row) if j not in pruned.get(i, [])) for i, row in enumerate(scores)]
    k = round(6 / 3)
    top = set(sorted(range(6), key=lambda i: -block[i])[:k])
    assert sorted(top) == method.layout["high_rank_layers"]
    ranks = lora_ranks_by_layer(model)
    want = {i: {8 if i in top else 4} for i in range(6) if len(pruned.get(i, [])) < 4}
    assert ranks == want
    # one key per high-rank layer, and trainable = LoRA (pruned widths) + LayerNorms + head
    assert len(method.layout["rank_pattern"]) == k
    per_layer = {i: 8 if i in top else 4 for i in range(6)}
    spec = method.build_phase("finetune")
    assert [g.name for g in spec.groups] == ["lora", "layernorm", "head"]
    assert n_trainable(spec) == expected_lora(model, pruned, per_layer) + expected_layernorms(model) + \
        head_params(model)


def test_trainable_count_matches_the_definition(arch):
    method, model, _ = build("prune-lora", arch, prune_count=3, top_blocks=1, r_high=6, r_low=2)
    pruned = pruned_heads_of(model.config)
    high = method.layout["high_rank_layers"]
    assert len(high) == 1
    ranks = {i: 6 if i in high else 2 for i in range(2)}
    spec = method.build_phase("finetune")
    assert n_trainable(spec) == expected_lora(model, pruned, ranks) + expected_layernorms(model) + \
        head_params(model)


def test_a_fully_pruned_layer_gets_no_lora(arch):
    method, model, _ = build("prune-lora", arch, prune_count=7)
    pruned = pruned_heads_of(model.config)
    empty = [l for l in range(2) if len(pruned.get(l, [])) == 4]
    assert len(empty) == 1
    assert set(lora_ranks_by_layer(model)) == {1 - empty[0]}
    spec = method.build_phase("finetune")
    ranks = {i: 8 if i in method.layout["high_rank_layers"] else 4 for i in range(2)}
    assert n_trainable(spec) == expected_lora(model, pruned, ranks) + expected_layernorms(model) + \
        head_params(model)
    losses = steps(spec, random_batch(model), n=5)
    assert losses[-1] < losses[0]


def test_prepare_is_deterministic(arch):
    a, _, _ = build("prune-lora", arch)
    b, _, _ = build("prune-lora", arch)
    assert torch.equal(a.scores, b.scores)
    assert a.pruned == b.pruned and a.layout == b.layout
    with pytest.raises(DiffpruneError, match="already pruned"):
        a.prepare(*toy_data(a.model))


# ------------------------------------------------------------------------------------------------ train, store

def test_trains_and_roundtrips(arch, tmp_path):
    method, model, head = build("prune-lora", arch, prune_count=3)
    batch = random_batch(model)
    spec = method.build_phase("finetune")
    frozen = {n: model.get_parameter(n).detach().clone() for n in method.inner.base_names}
    losses = steps(spec, batch)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    trained = logits(model, batch)

    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    assert diff.method == "prune-lora" and not diff.sparse
    assert set(diff.dense) == set(method.inner.lora_names) | set(method.inner.norm_names) | set(head)
    cfg = diff.config
    assert {int(k): v for k, v in cfg["pruned_heads"].items()} == method.pruned
    assert cfg["importance"] == method.scores.tolist()
    assert cfg["rank_pattern"] and cfg["fingerprint_base"] == method.inner.base_names
    save_diff(diff, tmp_path / "d", model)
    loaded = load_diff(tmp_path / "d")
    assert loaded.fingerprint is not None

    cls = get_method("prune-lora")
    fresh = cls.attach(make_tiny(arch), loaded.config)
    names = [n for n, _ in fresh.named_parameters()]
    assert cls.attach(fresh, loaded.config) is fresh and [n for n, _ in fresh.named_parameters()] == names
    apply_diff(fresh, loaded)
    assert torch.equal(logits(fresh, batch), trained)
    with pytest.raises(DiffpruneError, match="fingerprint"):
        apply_diff(cls.attach(make_tiny(arch, seed=1), loaded.config), loaded)

    # restore (what --resume does) puts the trained tensors back into a method prepared the same way
    other, fresh2, _ = build("prune-lora", arch, prune_count=3)
    other.restore(loaded)
    assert torch.equal(logits(fresh2, batch), trained)
    differently, _, _ = build("prune-lora", arch, prune_count=2)
    with pytest.raises(DiffpruneError, match="pruned heads"):
        differently.restore(loaded)

    # fold: LoRA merged into the pruned weights; saved and reloaded with load_pruned, same logits
    plain = cls.fold(fresh)
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path / "merged")
    merged = load_pruned(tmp_path / "merged")
    assert pruned_heads_of(merged.config) == method.pruned
    assert torch.allclose(logits(merged, batch), trained, atol=1e-5)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_head_pruning_roundtrips(finetune, tmp_path):
    method, model, head = build("head-pruning", "roberta", finetune=finetune, prune_count=3)
    c = method.config
    assert (c.lr, c.weight_decay) == ((5e-5, 0.0) if finetune == "full" else (5e-4, 0.1))
    batch = random_batch(model)
    spec = method.build_phase("finetune")
    pruned = pruned_heads_of(model.config)
    assert sum(map(len, pruned.values())) == 3
    if finetune == "full":
        assert n_trainable(spec) == sum(p.numel() for p in model.parameters())
    else:
        assert all(r == {8} for r in lora_ranks_by_layer(model).values())
        assert n_trainable(spec) == expected_lora(model, pruned, {0: 8, 1: 8}) + head_params(model)
    losses = steps(spec, batch, lr=1e-3 if finetune == "full" else 1e-2)
    assert losses[-1] < losses[0] - 0.05
    trained = logits(model, batch)

    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    assert diff.method == "head-pruning"
    if finetune == "full":  # every remaining parameter, as big as the pruned model; nothing to fingerprint
        assert set(diff.dense) == {n for n, _ in model.named_parameters()}
        assert "fingerprint_base" not in diff.config
    save_diff(diff, tmp_path / "d", model)
    loaded = load_diff(tmp_path / "d")
    cls = get_method("head-pruning")
    fresh = cls.attach(make_tiny("roberta"), loaded.config)
    apply_diff(fresh, loaded)
    assert torch.equal(logits(fresh, batch), trained)
    cls.fold(fresh).save_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(load_pruned(tmp_path / "merged"), batch), trained, atol=1e-5)


# ------------------------------------------------------------------------------------------------ config, errors

def test_config_defaults():
    c = make_config(get_method("prune-lora"), {})
    assert (c.importance_examples, c.importance_batch_size, c.prune_count, c.prune_fraction, c.prune_threshold,
            c.r_high, c.r_low, c.top_blocks, c.train_layernorm, c.lr, c.weight_decay, c.alpha) == (
        256, 32, None, 0.3, None, 8, 4, None, True, 5e-4, 0.01, 16.0)
    assert make_config(get_method("prune-lora"), {"prune_count": 5}).prune_fraction is None
    h = make_config(get_method("head-pruning"), {})
    assert (h.finetune, h.lr, h.weight_decay, h.rank) == ("full", 5e-5, 0.0, 8)


@pytest.mark.parametrize("options, match", [
    ({"prune_count": 3, "prune_fraction": 0.2}, "only one of"),
    ({"prune_count": -1}, "prune_count must be"),
    ({"prune_fraction": 1.5}, "prune_fraction is the share"),
    ({"r_high": 0}, "r_high must be a positive integer"),
    ({"top_blocks": -1}, "top_blocks must be"),
    ({"importance_examples": 0}, "importance_examples must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"rank": 4}, "unknown option"),
])
def test_config_validation(options, match):
    with pytest.raises(DiffpruneError, match=match):
        make_config(get_method("prune-lora"), options)


def test_errors_are_clear():
    cls = get_method("head-pruning")
    with pytest.raises(DiffpruneError, match="finetune must be one of"):
        make_config(cls, {"finetune": "bitfit"})
    model = make_tiny("t5")  # GPT-2 and the other families are supported now (tests/test_contract.py)
    with pytest.raises(DiffpruneError, match="do not support t5: T5 shares one per-head relative position bias"):
        cls(make_config(cls, {}), model, head_names_by_convention(model))
    model = make_tiny("bert")
    method = cls(make_config(cls, {}), model, head_names_by_convention(model))
    with pytest.raises(DiffpruneError, match="call prepare"):
        method.build_phase("finetune")
    with pytest.raises(DiffpruneError, match="top_blocks is 3"):
        build("prune-lora", "bert", top_blocks=3)


# ------------------------------------------------------------------------------------------------ end to end

def test_pipeline_run_and_load_task_model_reproduce_metrics(tmp_path, tiny_model_dir):
    from diffprune.api import load_task_model, train
    from diffprune.cli import main
    from diffprune.tasks import demo_task, write_demo_data

    spec = demo_task(write_demo_data(tmp_path / "data"))
    out = tmp_path / "run"
    metrics = train(str(out), model=str(tiny_model_dir), method="prune-lora", spec=spec, max_train_samples=48,
                    max_eval_samples=40, batch_size=16, max_length=16, epochs=1, importance_examples=32,
                    prune_count=3, progress=False, logging_steps=1)
    model, tokenizer, diff = load_task_model(out)
    assert diff.method == "prune-lora" and diff.fingerprint
    assert sum(map(len, pruned_heads_of(model.config).values())) == 3
    assert metrics["storage"]["dense_params"] == sum(t.numel() for t in diff.dense.values())

    assert_eval_reproduces(model, tokenizer, spec, out, tmp_path / "e")

    # merge keeps the model pruned; load_pruned reads it back with the same outputs
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = load_pruned(tmp_path / "merged")
    batch = tokenizer(["the film was great", "not bad at all"], return_tensors="pt", padding=True)
    assert torch.allclose(logits(merged, batch), logits(model, batch), atol=1e-5)


def test_resume_mid_phase_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """--resume calls prepare() again on a fresh base: same heads pruned, checkpointed LoRA tensors fit."""
    from diffprune.api import train
    from diffprune.tasks import demo_task, write_demo_data

    spec = demo_task(write_demo_data(tmp_path / "demo"))
    kw = dict(model=str(tiny_model_dir), method="prune-lora", spec=spec, max_train_samples=48, max_eval_samples=16,
              batch_size=16, max_length=16, epochs=2, prune_count=3, importance_examples=32, progress=False,
              save_steps=2)
    train(str(tmp_path / "straight"), **kw)

    with crash_at_step(monkeypatch, 4):  # 6 steps in all, checkpoint at step 2
        train(str(tmp_path / "resumed"), **kw)
    train(str(tmp_path / "resumed"), resume=True, **kw)
    a, b = load_diff(tmp_path / "straight" / "diff"), load_diff(tmp_path / "resumed" / "diff")
    assert a.config["pruned_heads"] == b.config["pruned_heads"] and a.fingerprint == b.fingerprint
    assert set(a.dense) == set(b.dense)
    assert all(torch.allclose(a.dense[n], b.dense[n], atol=1e-6) for n in a.dense)
