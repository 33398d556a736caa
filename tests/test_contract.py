"""The contract every method keeps, checked as one matrix: every registered method × twelve tiny families.

Families (tests/conftest.py): encoders bert, roberta, distilbert, deberta-v2 (disentangled relative
attention), roformer (rotary), modernbert (alternating local/global attention, fused q|k|v, no biases),
albert (one layer shared by all layers);
decoders gpt2 (Conv1D), llama and qwen2 (grouped-query attention, tied embeddings); encoder-decoders bart
and t5. A method refuses a family only where it has nothing to act on (`REFUSED`, with the reason).

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

from conftest import ALL_FAMILIES, make_tiny, random_batch
from diffprune.errors import DiffpruneError
from diffprune.methods import METHODS, get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

LABELS = torch.tensor([0, 1, 1])
ARCHS = ALL_FAMILIES
SPARSITY = 0.05
# (method, family) pairs refused because the method has nothing to act on there: the message must say why
_NO_BIAS = "no bias parameters outside the task head"
_T5_HEADS = "T5 shares one per-head relative position bias"
REFUSED = {("bitfit", "llama"): _NO_BIAS, ("bitfit", "modernbert"): _NO_BIAS, ("bitfit", "t5"): _NO_BIAS,
           ("prune-lora", "t5"): _T5_HEADS, ("head-pruning", "t5"): _T5_HEADS}
# the top transformer layer of each family, written out from its modelling code (decoder's for enc-dec)
TOP_LAYER = {"bert": "bert.encoder.layer.1.", "roberta": "roberta.encoder.layer.1.",
             "distilbert": "distilbert.transformer.layer.1.", "gpt2": "transformer.h.1.",
             "deberta-v2": "deberta.encoder.layer.1.", "roformer": "roformer.encoder.layer.1.",
             "modernbert": "model.layers.1.", "albert": "albert.encoder.albert_layer_groups.0.",
             "llama": "model.layers.1.", "qwen2": "model.layers.1.",
             "bart": "model.decoder.layers.1.", "t5": "transformer.decoder.block.1."}
# attention blocks per family (2 layers; an encoder-decoder: 2 encoder self + 2 decoder self + 2 cross) and
# whether q|k|v is one fused projection
ATTENTION_BLOCKS = {"bart": 6, "t5": 6, "albert": 1}  # ALBERT: one shared layer, applied twice
FUSED_QKV = {"gpt2", "modernbert"}
HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
OPTIONS = {"diff-pruning": {"sparsity": SPARSITY, "l0_epochs": 1.0},
           "non-adaptive-diff-pruning": {"sparsity": SPARSITY}, "lt-sft": {"sparsity": SPARSITY}}


def all_methods():
    get_method("full")  # loads the registry
    return sorted(METHODS)


def body_names(model, head):
    return [n for n, _ in model.named_parameters() if n not in set(head)]


def expected_trainable(name, phase, model, head, method, arch):
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
        return sum(numel[n] for n in body if n.startswith(TOP_LAYER[arch])) + head_n
    if name == "lora":  # rank 8 on q, k, v, o of every attention block: r·(in + out) per matrix
        r, kv = 8, getattr(model.config, "num_key_value_heads", HEADS) or HEADS
        qkv = r * (HIDDEN + 3 * HEADS * HEAD_DIM) if arch in FUSED_QKV else \
            r * (HIDDEN + HEADS * HEAD_DIM) + 2 * r * (HIDDEN + kv * HEAD_DIM)
        return ATTENTION_BLOCKS.get(arch, 2) * (qkv + r * (HEADS * HEAD_DIM + HIDDEN)) + head_n
    if name.startswith("adapter-"):  # m = 64: down H·m + m, up m·H + H; plus every norm of the body
        per_layer = 2 if name == "adapter-houlsby" else 1
        layers = 4 if model.config.is_encoder_decoder else 1 if arch == "albert" else 2
        m = 64
        norms = sum(numel[n] for n in body if any("norm" in p.lower() or p.startswith("ln_") for p in n.split(".")))
        return layers * per_layer * (2 * HIDDEN * m + m + HIDDEN) + norms + head_n
    if phase == "fixed_mask":
        return round(SPARSITY * d) + head_n
    if phase == "l0":
        return 2 * d + head_n  # w and α per diff-pruned entry
    return None  # Prune-LoRA / head pruning: counted in tests/test_prune_lora.py from config dimensions


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
    if (name, arch) in REFUSED:
        with pytest.raises(DiffpruneError, match=REFUSED[name, arch]):
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
        want = expected_trainable(name, phase, model, head, method, arch)
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

    if get_method(name).foldable:
        plain = cls.fold(fresh)
        plain.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    elif name.startswith("adapter"):
        with pytest.raises(DiffpruneError):
            cls.fold(fresh)


def test_every_method_says_whether_merge_gives_a_plain_model():
    """`foldable` is declared on each method (the merge tests above read it): adapters are non-linear and
    head-pruned models need diffprune's loader; everything else folds into plain weights."""
    folded = {name for name in all_methods() if get_method(name).foldable}
    assert set(all_methods()) - folded == {"adapter-houlsby", "adapter-pfeiffer", "prune-lora", "head-pruning"}
