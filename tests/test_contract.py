"""The contract every method keeps, checked as one matrix: every registered method × tiny architectures.

For each (method, architecture) the method wraps the model, trains exactly the parameters its definition
says (counted here from parameter names and config dimensions, not by the method's code), lowers the loss
on a fixed toy batch in every phase, and exports a diff that a fresh base model reproduces bit for bit
after `attach` + `apply_diff`. Where the method can fold into plain weights, `fold` + `save_pretrained`
reloads with plain transformers to the same logits. Per-method files test the details; this file makes
sure a new method cannot skip the contract.
"""
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny, random_batch
from diffprune.errors import DiffpruneError
from diffprune.methods import METHODS, get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

LABELS = torch.tensor([0, 1, 1])
ARCHS = ("bert", "roberta", "distilbert", "gpt2")
SPARSITY = 0.05
# architectures a method refuses by design (with a DiffpruneError naming the supported ones)
UNSUPPORTED = {"adapter-houlsby": {"gpt2"}, "adapter-pfeiffer": {"gpt2"}, "prune-lora": {"gpt2"},
               "head-pruning": {"gpt2"}}
FOLDABLE = {"full", "bitfit", "last-layer", "lora", "diff-pruning", "non-adaptive-diff-pruning", "lt-sft"}
OPTIONS = {"diff-pruning": {"sparsity": SPARSITY, "l0_epochs": 1.0},
           "non-adaptive-diff-pruning": {"sparsity": SPARSITY}, "lt-sft": {"sparsity": SPARSITY}}


def all_methods():
    get_method("full")  # loads the registry
    return sorted(METHODS)


def body_names(model, head):
    return [n for n, _ in model.named_parameters() if n not in set(head)]


def expected_trainable(name, phase, model, head, method):
    """Trainable count of `phase` from the method's definition, by name patterns and dimensions."""
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    head_n = sum(numel[n] for n in head)
    body = body_names(model, head)
    d = sum(numel[n] for n in body)
    if name == "full" or phase == "finetune" and name in ("non-adaptive-diff-pruning", "lt-sft"):
        return d + head_n
    if name == "bitfit":
        return sum(numel[n] for n in body if n.endswith(".bias")) + head_n
    if name == "last-layer":
        import re
        layers = {int(m.group(1)) for n in body if (m := re.search(r"\.(?:layer|h)\.(\d+)\.", n))}
        top = max(layers)
        return sum(numel[n] for n in body if re.search(rf"\.(?:layer|h)\.{top}\.", n)) + head_n
    if phase == "fixed_mask":
        return round(SPARSITY * d) + head_n
    if phase == "l0":
        return 2 * d + head_n  # w and α per diff-pruned entry
    return None  # adapters, LoRA, Prune-LoRA: counted in their own test files from config dimensions


def trainable(spec):
    params = [p for g in spec.groups for p in g.params]
    assert len({id(p) for p in params}) == len(params), "a parameter sits in two optimizer groups"
    assert all(p.requires_grad for p in params)
    return params


def run_phase(spec, batch, n=8, lr=1e-2):
    model = spec.model.eval()  # no dropout: the loss on the fixed batch is deterministic
    params = trainable(spec)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = model(**batch, labels=LABELS).loss
        losses.append(float(loss.detach()))
        if spec.penalty is not None:
            loss = loss + spec.penalty(1.0)
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(model(**batch, labels=LABELS).loss))
    changed = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, params))
    return losses, changed


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", all_methods())
def test_method_contract(name, arch, tmp_path):
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    cls = get_method(name)
    if arch in UNSUPPORTED.get(name, ()):
        with pytest.raises(DiffpruneError):
            method = cls(make_config(cls, OPTIONS.get(name, {})), model, head)
            method.prepare([], None)
            method.build_phase(method.phases[0])
        return
    torch.manual_seed(0)
    method = cls(make_config(cls, OPTIONS.get(name, {})), model, head)
    batch = random_batch(model)
    examples = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
                 "labels": LABELS[i]} for i in range(len(LABELS))]
    method.prepare(examples, lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    for phase in method.phases:
        spec = method.build_phase(phase)
        want = expected_trainable(name, phase, model, head, method)
        if want is not None:
            assert sum(p.numel() for p in trainable(spec)) == want, phase
        losses, changed = run_phase(spec, batch)
        assert losses[-1] < losses[0], f"{phase}: loss did not go down: {losses}"
        assert changed > len(head), f"{phase}: only the head (or nothing) changed"
        method.end_phase(phase)

    # export → save → load → fresh base (same seed) → attach + apply reproduces the logits exactly
    with torch.no_grad():
        expected = method.eval_model().eval()(**batch).logits
    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    save_diff(diff, tmp_path / "diff", model)
    fresh = cls.attach(make_tiny(arch), load_diff(tmp_path / "diff").config)
    apply_diff(fresh, load_diff(tmp_path / "diff"))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(**batch).logits, expected, atol=1e-6)

    if name in FOLDABLE:
        plain = cls.fold(fresh)
        plain.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    elif name.startswith("adapter"):
        with pytest.raises(DiffpruneError):
            cls.fold(fresh)
