"""Bottleneck adapters (Houlsby, Pfeiffer) on tiny BERT / RoBERTa / DistilBERT: what trains (counted from the
definition), near-identity start, training works, export → save → load → attach + apply parity, fingerprint
refusal, undiscoverable layouts, no folding, and one end-to-end run through `diffprune.api.train`. Every
other family: tests/test_contract.py."""
import copy

import pytest
import torch

from conftest import make_tiny, random_batch, phase_steps, crash_at_step, assert_eval_reproduces
from diffprune.errors import DiffpruneError
from diffprune.methods import get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

LABELS = torch.tensor([0, 1, 1])
ADAPTER_ARCHS = ("bert", "roberta", "distilbert")
METHODS = ("adapter-houlsby", "adapter-pfeiffer")
PER_LAYER = {"adapter-houlsby": 2, "adapter-pfeiffer": 1}  # adapters per transformer layer (the papers)


def build(name, arch, seed=0, **options):
    model = make_tiny(arch, seed=seed)
    head = head_names_by_convention(model)
    cls = get_method(name)
    return cls(make_config(cls, options), model, head), model, head


def dims(model):
    """(hidden, layers, labels) read from the transformers config, not from the modules."""
    c = model.config
    if c.model_type == "distilbert":
        return c.dim, c.n_layers, c.num_labels
    return c.hidden_size, c.num_hidden_layers, c.num_labels


def expected_trainable(name, arch, model, m, layernorm=True):
    """Trainable parameters from the definition: adapters + LayerNorms + task head, from config dims."""
    h, n_layers, c = dims(model)
    adapters = n_layers * PER_LAYER[name] * (2 * h * m + m + h)  # down (h·m + m) + up (m·h + h)
    # one LayerNorm (weight + bias) on the embeddings and two per layer, in all three architectures
    norms = 2 * h * (1 + 2 * n_layers) if layernorm else 0
    head = h * c + c  # the final classifier
    if arch in ("roberta", "distilbert"):  # plus a dense h → h layer before it (classifier.dense / pre_classifier)
        head += h * h + h
    return adapters + norms + head


def n_trainable(spec):
    params = [p for g in spec.groups for p in g.params]
    assert len({id(p) for p in params}) == len(params), "a parameter sits in two groups"
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in spec.model.parameters()) == len(params), "a trainable param has no group"
    return sum(p.numel() for p in params)


def steps(spec, batch, n=15, lr=1e-2):
    return phase_steps(spec, batch, LABELS, n, lr)


@pytest.fixture(params=ADAPTER_ARCHS)
def adapter_arch(request):
    return request.param


@pytest.fixture(params=METHODS)
def name(request):
    return request.param


# ------------------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("m", [8, 64])
def test_trainable_count_matches_the_definition(name, adapter_arch, m):
    method, model, head = build(name, adapter_arch, bottleneck=m)
    spec = method.build_phase("finetune")
    assert n_trainable(spec) == expected_trainable(name, adapter_arch, model, m)
    assert [g.name for g in spec.groups] == ["adapters", "head"]
    assert {id(p) for p in spec.groups[1].params} == {id(model.get_parameter(n)) for n in head}


def test_layernorms_can_stay_frozen(name):
    method, model, _ = build(name, "bert", bottleneck=8, train_layernorm=False)
    assert n_trainable(method.build_phase("finetune")) == expected_trainable(name, "bert", model, 8, False)


def test_base_names_unchanged_and_adapter_names(name, adapter_arch):
    base = make_tiny(adapter_arch)
    before = set(base.state_dict())
    method, model, _ = build(name, adapter_arch, bottleneck=8)
    after = set(model.state_dict())
    assert before <= after
    added = after - before
    assert added == set(method.adapter_names)
    assert all(".adapter.down." in n or ".adapter.up." in n for n in added)
    h, n_layers, _ = dims(model)
    assert len(added) == 4 * n_layers * PER_LAYER[name]
    # sites, spelled out independently of the method's architecture table
    site = {"bert": "bert.encoder.layer.{}.output.dense", "roberta": "roberta.encoder.layer.{}.output.dense",
            "distilbert": "distilbert.transformer.layer.{}.ffn.lin2"}[adapter_arch]
    assert f"{site.format(1)}.adapter.up.weight" in added
    attn = {"bert": "bert.encoder.layer.{}.attention.output.dense",
            "roberta": "roberta.encoder.layer.{}.attention.output.dense",
            "distilbert": "distilbert.transformer.layer.{}.attention.out_lin"}[adapter_arch]
    assert (f"{attn.format(0)}.adapter.down.weight" in added) == (name == "adapter-houlsby")


def test_attach_is_idempotent_and_refuses_other_adapters(name):
    method, model, _ = build(name, "bert", bottleneck=8)
    names = [n for n, _ in model.named_parameters()]
    cls = get_method(name)
    assert cls.attach(model, method.config.to_dict()) is model
    assert [n for n, _ in model.named_parameters()] == names
    other = "adapter-pfeiffer" if name == "adapter-houlsby" else "adapter-houlsby"
    with pytest.raises(DiffpruneError, match="already carries"):
        get_method(other).attach(model, {"bottleneck": 8})
    with pytest.raises(DiffpruneError, match="already carries"):
        cls.attach(model, {"bottleneck": 16})


def test_near_identity_at_start(name, adapter_arch):
    base = make_tiny(adapter_arch)
    batch = random_batch(base)
    _, model, _ = build(name, adapter_arch)  # default bottleneck 64, init_std 1e-3
    with torch.no_grad():
        want, got = base(**batch).logits, model(**batch).logits
    # the adapters change each site's output by O(init_std²): far below 1e-3 on these logits
    assert torch.allclose(got, want, atol=1e-3, rtol=0)
    assert not torch.equal(got, want)  # ... but they are in the forward pass


def test_hook_follows_deepcopy():
    _, model, _ = build("adapter-houlsby", "bert", bottleneck=8)
    twin = copy.deepcopy(model)
    batch = random_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
        g = torch.Generator().manual_seed(0)
        for name, p in twin.named_parameters():
            if ".adapter." in name and name.endswith(".weight"):  # random: a constant shift LayerNorm would undo
                p.copy_(torch.randn(p.shape, generator=g))
        assert torch.equal(model(**batch).logits, before)  # the copy's adapters are its own
        assert not torch.allclose(twin(**batch).logits, before, atol=1e-3)


# ------------------------------------------------------------------------------------------- training, storage

def test_trains_and_roundtrips(name, adapter_arch, tmp_path):
    method, model, head = build(name, adapter_arch, bottleneck=8)
    spec = method.build_phase("finetune")
    trainable = {id(p) for g in spec.groups for p in g.params}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}
    batch = random_batch(model)
    losses = steps(spec, batch)
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    with torch.no_grad():
        expected = model.eval()(**batch).logits

    diff = method.export()
    assert not diff.sparse
    assert set(diff.dense) == set(method.adapter_names) | set(method.layernorm_names) | set(head)
    assert diff.config["fingerprint_base"] == sorted(frozen)
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    save_diff(diff, tmp_path / "d", model)
    loaded = load_diff(tmp_path / "d")
    assert loaded.fingerprint is not None

    fresh = make_tiny(adapter_arch)  # same seed → same θ; its adapters get overwritten by the diff
    get_method(loaded.method).attach(fresh, loaded.config)
    apply_diff(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)

    other, _, _ = build(name, adapter_arch, bottleneck=8)  # --resume path: restore into a new method
    other.restore(loaded)
    with torch.no_grad():
        assert torch.equal(other.eval_model().eval()(**batch).logits, expected)

    # (e) a base with other pretrained weights is refused, and left untouched
    stranger = make_tiny(adapter_arch, seed=1)
    get_method(loaded.method).attach(stranger, loaded.config)
    snapshot = {n: p.detach().clone() for n, p in stranger.named_parameters()}
    with pytest.raises(DiffpruneError, match="fingerprint"):
        apply_diff(stranger, loaded)
    assert all(torch.equal(p, snapshot[n]) for n, p in stranger.named_parameters())
    # one frozen base weight changed is enough
    nudged = make_tiny(adapter_arch)
    with torch.no_grad():
        nudged.get_parameter(sorted(frozen)[0]).view(-1)[0] += 1e-3
    get_method(loaded.method).attach(nudged, loaded.config)
    with pytest.raises(DiffpruneError, match="fingerprint"):
        apply_diff(nudged, loaded)
    # a base without the adapters attached: named, not a crash
    with pytest.raises(DiffpruneError, match="no parameter"):
        apply_diff(make_tiny(adapter_arch), loaded)


# ------------------------------------------------------------------------------------------- errors, config

class _NoLayers(torch.nn.Module):
    """A model with no transformer layers to find."""
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "oddity"})()
        self.proj = torch.nn.Linear(4, 4)


def test_undiscoverable_layout_says_how_to_override(name):
    """Adapters go wherever archs.describe finds layers (GPT-2 included, see test_contract); a model where
    it finds none is refused with what was missing and how to override it."""
    cls = get_method(name)
    with pytest.raises(DiffpruneError, match=r"oddity: found no transformer layers.*OVERRIDES.*DIFFPRUNE_ARCH"):
        cls.attach(_NoLayers(), {})


def test_fold_is_refused(name):
    _, model, _ = build(name, "bert", bottleneck=8)
    with pytest.raises(DiffpruneError, match="cannot be merged.*load_task_model"):
        get_method(name).fold(model)


def test_config_defaults_and_validation():
    houlsby = make_config(get_method("adapter-houlsby"), {})
    pfeiffer = make_config(get_method("adapter-pfeiffer"), {})
    assert (houlsby.bottleneck, houlsby.activation, houlsby.lr, houlsby.init_std) == (64, "gelu", 1e-4, 1e-3)
    assert (pfeiffer.bottleneck, pfeiffer.activation) == (64, "relu")
    cls = get_method("adapter-houlsby")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DiffpruneError, match="bottleneck"):
            make_config(cls, dict(bottleneck=bad))
    with pytest.raises(DiffpruneError, match="did you mean 'gelu'"):
        make_config(cls, dict(activation="gleu"))
    with pytest.raises(DiffpruneError, match="init_std"):
        make_config(cls, dict(init_std=0.0))
    with pytest.raises(DiffpruneError, match="lr"):
        make_config(cls, dict(lr=0))
    with pytest.raises(DiffpruneError, match="unknown option"):
        make_config(cls, dict(sparsity=0.5))


# ------------------------------------------------------------------------------------------- end to end

def test_pipeline_run_and_load_task_model_reproduce_metrics(tmp_path, tiny_model_dir):
    from diffprune.api import load_task_model, train
    from diffprune.tasks import demo_task, write_demo_data

    spec = demo_task(write_demo_data(tmp_path / "data"))
    out = tmp_path / "run"
    metrics = train(str(out), model=str(tiny_model_dir), method="adapter-houlsby", spec=spec,
                    max_train_samples=48, max_eval_samples=40, batch_size=16, max_length=16, epochs=1,
                    bottleneck=8, progress=False, logging_steps=1)
    assert set(metrics["phases"]) == {"finetune"}
    model, tokenizer, diff = load_task_model(out)
    assert diff.method == "adapter-houlsby" and not diff.sparse and diff.fingerprint
    assert metrics["storage"]["dense_params"] == expected_trainable("adapter-houlsby", "bert", model, 8)
    assert sum(".adapter." in n for n in diff.dense) == 4 * 2 * model.config.num_hidden_layers

    assert_eval_reproduces(model, tokenizer, spec, out, tmp_path / "e")


def test_resume_mid_phase_restores_adapters(tmp_path, tiny_model_dir, monkeypatch):
    """A crash after a checkpoint, then --resume: the checkpoint carries the adapters back in."""
    from diffprune.api import train
    from diffprune.tasks import demo_task, write_demo_data

    spec = demo_task(write_demo_data(tmp_path / "data"))
    opts = dict(model=str(tiny_model_dir), method="adapter-pfeiffer", spec=spec, max_train_samples=48,
                max_eval_samples=16, batch_size=16, max_length=16, epochs=1, bottleneck=8, progress=False,
                save_steps=2)
    train(str(tmp_path / "whole"), **opts)

    with crash_at_step(monkeypatch, 3):  # the last of 3 steps, after the checkpoint at step 2
        train(str(tmp_path / "resumed"), **opts)
    train(str(tmp_path / "resumed"), resume=True, **opts)
    whole, resumed = load_diff(tmp_path / "whole" / "diff"), load_diff(tmp_path / "resumed" / "diff")
    assert set(whole.dense) == set(resumed.dense)
    for n, v in whole.dense.items():
        assert torch.allclose(resumed.dense[n], v, atol=1e-6), n
