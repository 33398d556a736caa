"""LoRA through PEFT on tiny bert/roberta/distilbert/gpt2: what trains (counted from the definition), that
the model starts as the base, that it learns, save → attach → apply parity, merge parity, rank patterns,
and one end-to-end run through `diffprune.api.train` and `diffprune merge`."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny, random_batch, phase_steps, crash_at_step
from diffprune.errors import DiffpruneError
from diffprune.methods import get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

LABELS = torch.tensor([0, 1, 1])
RANK = 4


def build(arch, **options):
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    cls = get_method("lora")
    return cls(make_config(cls, {"rank": RANK, **options}), model, head), model, head


def n_trainable(spec):
    params = [p for g in spec.groups for p in g.params]
    assert len({id(p) for p in params}) == len(params), "a parameter sits in two groups"
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in spec.model.parameters()) == len(params), "a trained tensor has no group"
    return sum(p.numel() for p in params)


def expected_lora_params(arch, model, r=RANK):
    """r·(in + out) per adapted matrix, with the matrices spelled out from the model config."""
    c = model.config
    if arch == "gpt2":  # c_attn: h → 3h (q, k, v in one), attn.c_proj: h → h
        h, layers = c.n_embd, c.n_layer
        return layers * (r * (h + 3 * h) + r * (h + h))
    h = c.dim if arch == "distilbert" else c.hidden_size
    layers = c.n_layers if arch == "distilbert" else c.num_hidden_layers
    return layers * 4 * r * (h + h)  # q, k, v, o: h → h each


def steps(spec, batch, n=15, lr=1e-2):
    return phase_steps(spec, batch, LABELS, n, lr)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


# ------------------------------------------------------------------------------------------------ contract

def test_lora_contract(arch, tmp_path):
    method, model, head = build(arch)
    batch = random_batch(model)
    base_logits = logits(make_tiny(arch), batch)

    # (a) trainable = LoRA matrices (counted from the config) + head; base weights frozen under new names
    spec = method.build_phase("finetune")
    head_params = sum(model.get_parameter(n).numel() for n in head)
    assert sum(model.get_parameter(n).numel() for n in method.lora_names) == expected_lora_params(arch, model)
    assert n_trainable(spec) == expected_lora_params(arch, model) + head_params
    assert [g.name for g in spec.groups] == ["lora", "head"]
    assert any(".base_layer.weight" in n for n in method.base_names)

    # (b) B = 0 at init: the model is exactly the base model
    assert torch.equal(logits(model, batch), base_logits)

    # (c) it learns; the base stays frozen
    frozen = {n: model.get_parameter(n).detach().clone() for n in method.base_names}
    losses = steps(spec, batch)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    trained = logits(model, batch)
    assert not torch.allclose(trained, base_logits, atol=1e-4)

    # (d) export → save → load → fresh base → attach → apply: identical logits; the fingerprint covers the base
    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    assert set(diff.dense) == set(method.lora_names) | set(head) and not diff.sparse
    assert diff.config["fingerprint_base"] == method.base_names
    save_diff(diff, tmp_path / "d", model)
    loaded = load_diff(tmp_path / "d")
    assert loaded.fingerprint is not None
    cls = get_method("lora")
    fresh = cls.attach(make_tiny(arch), loaded.config)
    apply_diff(fresh, loaded)
    assert torch.equal(logits(fresh, batch), trained)
    other_base = cls.attach(make_tiny(arch, seed=1), loaded.config)
    with pytest.raises(DiffpruneError, match="fingerprint"):
        apply_diff(other_base, loaded)

    # (e) fold → save_pretrained → plain transformers load: same logits, usual names, nothing missing
    plain = cls.fold(fresh)
    assert not hasattr(plain, "peft_config")
    names = [n for n, _ in plain.named_parameters()]
    assert not any("base_layer" in n or "lora_" in n for n in names)
    assert sorted(names) == sorted(n for n, _ in make_tiny(arch).named_parameters())
    plain.save_pretrained(tmp_path / "merged")
    merged, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged",
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(logits(merged, batch), trained, atol=1e-5)


def test_rank_pattern_sets_per_layer_ranks(arch):
    targets = {"bert": "layer.1.attention.self.query", "roberta": "layer.1.attention.self.value",
               "distilbert": "layer.0.attention.out_lin", "gpt2": "h.1.attn.c_attn"}
    key = targets[arch]
    method, model, _ = build(arch, rank_pattern={key: 2, r"layer\.0\.attention\.self\.key": 6} if arch == "bert"
                             else {key: 2})
    ranks = {n[: -len(".lora_A.default.weight")]: model.get_parameter(n).shape[0]
             for n in method.lora_names if n.endswith("lora_A.default.weight")}
    assert len(ranks) == (4 if arch == "gpt2" else 8)
    want = {m: 2 if m.endswith(key) else RANK for m in ranks}
    if arch == "bert":  # a regex key: PEFT matches it against the end of the module name
        want["bert.encoder.layer.0.attention.self.key"] = 6
    assert ranks == want
    # B's inner dimension follows A's, and the count is still r·(in + out) per matrix
    for mod, r in ranks.items():
        assert model.get_parameter(f"{mod}.lora_B.default.weight").shape[1] == r


def test_alpha_pattern_changes_the_scaling():
    method, model, _ = build("bert", alpha=8.0, alpha_pattern={"layer.0.attention.self.query": 2.0})
    q0 = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    q1 = model.get_submodule("bert.encoder.layer.1.attention.self.query")
    assert q0.scaling["default"] == pytest.approx(2.0 / RANK) and q1.scaling["default"] == pytest.approx(8.0 / RANK)


def test_train_layernorm_adds_every_layernorm(arch, tmp_path):
    method, model, head = build(arch, train_layernorm=True)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    ln = sum(p.numel() for n in norms for p in model.get_submodule(n).parameters())
    spec = method.build_phase("finetune")
    assert [g.name for g in spec.groups] == ["lora", "layernorm", "head"]
    head_params = sum(model.get_parameter(n).numel() for n in head)
    assert n_trainable(spec) == expected_lora_params(arch, model) + ln + head_params
    batch = random_batch(model)
    steps(spec, batch, n=3)
    diff = method.export()
    assert not set(diff.config["fingerprint_base"]) & set(diff.dense)
    save_diff(diff, tmp_path / "d", model)
    other, fresh, _ = build(arch, train_layernorm=True)
    other.restore(load_diff(tmp_path / "d"))
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def test_default_lora_matches_the_seed_layout():
    """bert defaults: q, k, v and attention.output.dense only (the feed-forward output.dense is left alone)."""
    method, model, _ = build("bert")
    adapted = {n.rsplit(".lora_A", 1)[0] for n in method.lora_names if ".lora_A." in n}
    assert adapted == {f"bert.encoder.layer.{i}.attention.{m}" for i in range(2)
                       for m in ("self.query", "self.key", "self.value", "output.dense")}
    c = make_config(get_method("lora"), {})
    assert (c.rank, c.alpha, c.dropout, c.lr, c.weight_decay, c.train_layernorm, c.init) == (
        8, 16.0, 0.1, 5e-4, 0.1, False, "gaussian")


def test_attach_is_idempotent_and_ignores_stored_extras():
    cls = get_method("lora")
    model = make_tiny("bert")
    config = {**make_config(cls, {"rank": RANK}).to_dict(), "fingerprint_base": ["x"]}
    cls.attach(model, config)
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert cls.attach(model, config) is model
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_kaiming_init_and_explicit_targets():
    method, model, _ = build("bert", targets="query,value", init="kaiming")
    assert len(method.lora_names) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    assert torch.equal(logits(model, random_batch(model)), logits(make_tiny("bert"), random_batch(model)))


def test_restore_roundtrip():
    method, model, _ = build("distilbert")
    steps(method.build_phase("finetune"), random_batch(model), n=3)
    diff = method.export()
    other, fresh, _ = build("distilbert")
    other.restore(diff)
    assert all(torch.equal(fresh.get_parameter(n), v) for n, v in diff.dense.items())
    mismatched, _, _ = build("distilbert", targets=["q_lin"])
    with pytest.raises(DiffpruneError, match="other targets or ranks"):
        mismatched.restore(diff)


# ------------------------------------------------------------------------------------------------ errors

class _UnknownArch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "t5"})()
        self.proj = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.proj(x))


def test_unknown_architecture_needs_targets():
    cls = get_method("lora")
    with pytest.raises(DiffpruneError, match=r"t5: found no transformer layers.*DIFFPRUNE_ARCH.*--set targets"):
        cls(make_config(cls, {}), _UnknownArch(), ["classifier.weight", "classifier.bias"])
    method = cls(make_config(cls, {"targets": ["proj"], "rank": 2}), _UnknownArch(),
                 ["classifier.weight", "classifier.bias"])
    assert n_trainable(method.build_phase("finetune")) == 2 * (4 + 4) + 10


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\] must be a positive integer"),
    ({"rank_pattern": ["query"]}, "rank_pattern must map"),
    ({"init": "xavier"}, "init must be one of"),
    ({"rnak": 4}, "unknown option"),
])
def test_config_validation(options, match):
    with pytest.raises(DiffpruneError, match=match):
        make_config(get_method("lora"), options)


@pytest.mark.parametrize("options, match", [
    ({"targets": ["nonexistent"]}, "match no module"),
    ({"targets": ["dense"]}, "task-head module"),  # RoBERTa's classifier.dense
    ({"rank_pattern": {"layer.7.attention.self.query": 2}}, "matches none of the adapted modules"),
    ({"targets": ["attention"]}, "PEFT cannot adapt"),  # a whole block, not a Linear
])
def test_bad_targets_are_clear_errors(options, match):
    with pytest.raises(DiffpruneError, match=match):
        build("roberta", **options)


# ------------------------------------------------------------------------------------------------ end to end

def test_train_then_merge_end_to_end(tmp_path, tiny_model_dir):
    from diffprune.api import load_task_model, train
    from diffprune.cli import main
    from diffprune.tasks import write_demo_data
    from diffprune.tasks.demo_data import demo_task

    data = write_demo_data(tmp_path / "demo")
    out = tmp_path / "run"
    metrics = train(str(out), model=str(tiny_model_dir), method="lora", spec=demo_task(data),
                    max_train_samples=48, max_eval_samples=40, batch_size=16, max_length=16, epochs=1,
                    rank=RANK, progress=False, logging_steps=1)
    assert "accuracy" in metrics["final"]["dev"]
    assert metrics["storage"]["dense_params"] == json.loads((out / "diff" / "diff_config.json").read_text())[
        "sizes"]["dense_params"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)

    applied, tokenizer, diff = load_task_model(out)  # attaches, checks the fingerprint, applies
    assert diff.method == "lora" and diff.fingerprint is not None
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    batch = tokenizer(["the film was great", "not bad at all"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, applied(**batch).logits, atol=1e-5)


def test_resume_mid_phase_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """Trainer checkpoints of the injected model (base_layer / lora_ names) restore exactly on --resume."""
    from diffprune.api import train
    from diffprune.tasks import write_demo_data
    from diffprune.tasks.demo_data import demo_task

    spec = demo_task(write_demo_data(tmp_path / "demo"))
    kw = dict(model=str(tiny_model_dir), method="lora", spec=spec, max_train_samples=48, max_eval_samples=16,
              batch_size=16, max_length=16, epochs=2, rank=RANK, progress=False, save_steps=2)
    train(str(tmp_path / "straight"), **kw)

    with crash_at_step(monkeypatch, 4):  # 6 steps in all, checkpoint at step 2
        train(str(tmp_path / "resumed"), **kw)
    assert (tmp_path / "resumed" / "phases" / "finetune" / "checkpoints" / "checkpoint-2").exists()
    train(str(tmp_path / "resumed"), resume=True, **kw)
    a, b = load_diff(tmp_path / "straight" / "diff"), load_diff(tmp_path / "resumed" / "diff")
    assert set(a.dense) == set(b.dense) and a.fingerprint == b.fingerprint
    assert all(torch.allclose(a.dense[n], b.dense[n], atol=1e-6) for n in a.dense)
