"""Diff Pruning over real (tiny) transformers: θ + δ semantics, phases, export → apply parity."""
import pytest
import torch

from conftest import make_tiny, random_batch
from diffprune.core.diff_vector import FixedMaskDiff, L0Diff
from diffprune.errors import DiffpruneError
from diffprune.methods import get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.sparse_model import DeltaModel, layout_for, select_parameters
from diffprune.storage import apply_diff, load_diff, save_diff


def test_l0_model_with_zero_w_equals_base(arch):
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    batch = random_batch(model)
    expected = model(**batch).logits
    source = L0Diff(layout_for(model, select_parameters(model, head)))
    dm = DeltaModel(model, source, head).eval()
    assert torch.allclose(dm(**batch).logits, expected, atol=1e-6)


def test_fixed_mask_model_equals_base_plus_dense_delta(arch):
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    names = select_parameters(model, head)
    layout = layout_for(model, names)
    torch.manual_seed(3)
    idx = torch.randperm(layout.total)[:40].sort().values
    vals = torch.randn(40) * 0.1
    dm = DeltaModel(model, FixedMaskDiff(layout, idx, vals), head).eval()
    batch = random_batch(model)
    got = dm(**batch).logits
    # independent computation: add the dense δ into a copy of the weights
    ref = make_tiny(arch)
    dense = torch.zeros(layout.total).index_put((idx,), vals)
    with torch.no_grad():
        for name, part in zip(layout.names, layout.split(dense)):
            ref.get_parameter(name).add_(part)
    assert torch.allclose(got, ref(**batch).logits, atol=1e-5)


def test_head_is_dense_and_frozen_base_gets_no_grad():
    model = make_tiny("bert")
    head = head_names_by_convention(model)
    assert head == ["classifier.weight", "classifier.bias"]
    source = L0Diff(layout_for(model, select_parameters(model, head)))
    dm = DeltaModel(model, source, head).train()
    out = dm(**random_batch(model), labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    assert source.w.grad is not None and source.log_alpha.grad is not None
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if n not in head)


def test_tied_weights_are_diff_pruned_once():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, tie_word_embeddings=True))
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    names = select_parameters(model, [])
    assert sum("word_embeddings" in n or "decoder.weight" in n for n in names) == 1
    layout = layout_for(model, names)
    assert layout.total == sum(p.numel() for p in model.parameters())  # parameters() deduplicates
    # a δ on the shared tensor reaches both the embedding and the output projection
    name = next(n for n in names if n.endswith("word_embeddings.weight") or n.endswith("decoder.weight"))
    i = names.index(name)
    idx = torch.tensor([layout.offsets[i] + 5 * 16 + 3])
    dm = DeltaModel(model, FixedMaskDiff(layout, idx, torch.tensor([1.0])), []).eval()
    eff = dm.effective_parameters()
    assert list(eff) == [name] and eff[name].view(-1)[5 * 16 + 3] == decoder.view(-1)[5 * 16 + 3] + 1


def test_include_exclude_patterns():
    model = make_tiny("bert")
    head = head_names_by_convention(model)
    only_bias = select_parameters(model, head, include=["*.bias"])
    assert only_bias and all(n.endswith(".bias") for n in only_bias)
    no_ln = select_parameters(model, head, exclude=["*LayerNorm*"])
    assert not any("LayerNorm" in n for n in no_ln)


@pytest.mark.parametrize("structured", [False, True])
def test_phases_project_to_exact_sparsity_and_export_roundtrip(tmp_path, structured):
    model = make_tiny("bert")
    head = head_names_by_convention(model)
    cls = get_method("diff-pruning")
    cfg = make_config(cls, dict(sparsity=0.01, structured=structured, alpha_init=0.5, gate_choice="learned"))
    method = cls(cfg, model, head)
    spec = method.build_phase("l0")
    assert [g.name for g in spec.groups] == ["diff", "alpha", "head"]
    assert spec.groups[1].schedule == "constant" and spec.groups[1].hold == cfg.target_hold
    assert not spec.groups[1].clip  # the gates' gradients stay out of gradient clipping
    spec.plan(40)  # a 20-step density ramp: the gates may move α₀ + 5 in half of it, and α's lr follows
    assert spec.groups[1].lr == pytest.approx(2 * (0.5 + 5.0) / 20)
    with torch.no_grad():
        spec.model.source.w.normal_()
    method.end_phase("l0")
    d = method.layout.total
    k = round(0.01 * d)
    assert method.delta_model.source.indices.numel() == k
    fm = method.build_phase("fixed_mask")
    with torch.no_grad():
        fm.model.source.values.add_(0.05)
    batch = random_batch(model)
    logits = method.eval_model().eval()(**batch).logits

    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    assert diff.nnz == k
    save_diff(diff, tmp_path / "d", model)
    fresh = make_tiny("bert")  # same seed: same θ, but a different random head
    apply_diff(fresh, load_diff(tmp_path / "d"))
    assert torch.allclose(fresh(**batch).logits, logits, atol=1e-5)


def test_sparsity_out_of_range_is_a_clear_error():
    from diffprune.errors import DiffpruneError

    cls = get_method("diff-pruning")
    for bad in (0.0, 1.5, -1):
        with pytest.raises(DiffpruneError, match=r"sparsity.*\(0, 1\]"):
            make_config(cls, dict(sparsity=bad))


def test_unknown_method_suggests():
    from diffprune.errors import DiffpruneError

    with pytest.raises(DiffpruneError, match="did you mean 'diff-pruning'"):
        get_method("diff-prunning")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_row_gated_embedding_matches_whole_tensor_gating(arch):
    """Gating only the used word-embedding rows gives the same outputs and the same gradients."""
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    batch = random_batch(model)
    labels = torch.tensor([0, 1, 0])
    results = []
    for rows in (False, True):
        torch.manual_seed(0)
        source = L0Diff(layout_for(model, select_parameters(model, head)), alpha_init=0.3)
        with torch.no_grad():
            source.w.normal_(0, 0.05)
        dm = DeltaModel(model, source, head, gate_used_rows=rows)
        assert (dm._rows is not None) == rows
        dm.eval()
        eval_logits = dm(**batch).logits.detach()
        # training mode with fully open gates (α large): samples are exactly 1, so both paths are comparable
        with torch.no_grad():
            source.log_alpha.fill_(20.0)
        dm.train()
        model.zero_grad()
        for m in model.modules():  # no dropout noise
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        dm(**batch, labels=labels).loss.backward()
        results.append((eval_logits, source.w.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[1][1].abs().sum() > 0


def test_row_gating_is_off_for_tied_embeddings():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, tie_word_embeddings=True))
    source = L0Diff(layout_for(model, select_parameters(model, [])))
    assert DeltaModel(model, source, []).__dict__["_rows"] is None


def test_l0_warmup_ramps_lambda_and_is_validated():
    from diffprune.errors import DiffpruneError

    model = make_tiny("bert")
    head = head_names_by_convention(model)
    cls = get_method("diff-pruning")
    method = cls(make_config(cls, {"l0_lambda": 2.0, "l0_warmup": 0.5}), model, head)
    assert [method.l0_weight(p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 1.0, 2.0, 2.0]
    spec = method.build_phase("l0")
    expected = 2.0 * float(spec.model.source.expected_l0().detach())
    assert float(spec.penalty(0.0).detach()) == 0.0 and float(spec.penalty(1.0).detach()) == pytest.approx(expected)
    with pytest.raises(DiffpruneError, match="l0_warmup"):
        make_config(cls, {"l0_warmup": 1.0})


def test_group_schedule_hold_gives_zero_then_the_schedule():
    from diffprune.errors import DiffpruneError
    from diffprune.train.trainer import group_lambda

    constant = group_lambda("constant", warmup=0, total=10, hold=4)
    assert [constant(s) for s in range(6)] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    linear = group_lambda("linear", warmup=0, total=10, hold=2)
    assert [linear(s) for s in (0, 1, 2, 5, 9)] == [0.0, 0.0, 0.8, 0.5, 0.1]
    assert group_lambda("linear", 2, 10)(0) == 0.5  # no hold: the warmup as before
    scaled = group_lambda("linear", warmup=0, total=10, hold=2, scale=lambda p: 1 + 10 * p)
    assert [scaled(s) for s in (0, 2, 5)] == pytest.approx([0.0, 0.8 * 3.0, 0.5 * 6.0])
    cls = get_method("diff-pruning")
    with pytest.raises(DiffpruneError, match="alpha_hold"):
        make_config(cls, {"alpha_hold": 1.0})


def test_target_mode_raises_w_lr_with_the_closing_gates_to_the_fixed_mask_rate():
    from diffprune.train.trainer import group_lambda

    model = make_tiny("bert")
    head = [n for n, _ in model.named_parameters() if n.startswith("classifier")]
    cls = get_method("diff-pruning")
    for options, end in (({}, 5e-5 / 0.01 ** 0.5), ({"fixed_lr": 2e-4}, 2e-4)):  # default: lr / √t
        spec = cls(make_config(cls, {"sparsity": 0.01, **options}), model, head).build_phase("l0")
        spec.plan(100)
        diff = next(g for g in spec.groups if g.name == "diff")
        rate = group_lambda(diff.schedule, 0, 100, 0, diff.scale)
        assert rate(0) * diff.lr == pytest.approx(5e-5)  # gates held open: the plain rate
        assert rate(80) * diff.lr == pytest.approx(end)  # density t reached: the fixed-mask rate
    for options in ({"l0_lambda": 1e-7}, {"lr_follows_density": False}):  # the paper's schedule
        spec = cls(make_config(cls, options), model, head).build_phase("l0")
        diff = next(g for g in spec.groups if g.name == "diff")
        assert diff.scale is None and diff.schedule == "linear"


@pytest.mark.parametrize("structured", [False, True])
def test_from_l0_projects_a_kept_l0_state_to_another_sparsity(tmp_path, structured):
    """keep_l0_state writes w, α and the head at the end of the L0 phase; a method with from_l0 loads
    them, runs only its fixed-mask phase, and starts from the same projection the source would make at
    that sparsity."""
    import safetensors.torch

    from diffprune.methods.diff_pruning import L0_STATE_FILE

    torch.manual_seed(0)
    model = make_tiny("bert")
    head = head_names_by_convention(model)
    cls = get_method("diff-pruning")
    source = cls(make_config(cls, dict(sparsity=0.02, structured=structured, keep_l0_state=True)), model, head)
    spec = source.build_phase("l0")
    with torch.no_grad():
        spec.model.source.w.normal_()
        spec.model.source.log_alpha.uniform_(-3, 3)
    trained = spec.model.source
    source.end_phase("l0")
    state = source.saved_files["l0"][L0_STATE_FILE]
    assert torch.equal(state["w"], trained.w.detach()) and torch.equal(state["log_alpha"], trained.log_alpha.detach())
    (tmp_path / "phases" / "l0").mkdir(parents=True)
    safetensors.torch.save_file(state, str(tmp_path / "phases" / "l0" / L0_STATE_FILE))

    reference = cls(make_config(cls, dict(sparsity=0.005, structured=structured)), make_tiny("bert"), head)
    ref_spec = reference.build_phase("l0")
    with torch.no_grad():
        ref_spec.model.source.w.copy_(state["w"])
        ref_spec.model.source.log_alpha.copy_(state["log_alpha"])
        if structured:
            ref_spec.model.source.group_log_alpha.copy_(state["group_log_alpha"])
    reference.end_phase("l0")

    follower = cls(make_config(cls, dict(sparsity=0.005, structured=structured, from_l0=str(tmp_path))),
                   make_tiny("bert"), head)
    assert follower.phases == ("fixed_mask",)
    follower.prepare(None, None)
    got, want = follower.delta_model.source, reference.delta_model.source
    assert got.indices.numel() == round(0.005 * follower.layout.total)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    head_name = head[0]
    assert torch.equal(follower.model.get_parameter(head_name), state["head." + head_name])
    with pytest.raises(DiffpruneError, match="keep_l0_state"):
        cls(make_config(cls, dict(from_l0=str(tmp_path / "nothing"))), make_tiny("bert"), head)


def test_gate_gradients_stay_out_of_gradient_clipping(tmp_path):
    """The L0 phase clips w and the head only: α's gradient (which in the paper's mode carries the penalty
    over every gate) neither counts towards the norm nor is scaled by it."""
    from transformers import TrainingArguments

    from diffprune.train.trainer import PhaseTrainer, _ClipGroups

    model = make_tiny("bert")
    head = head_names_by_convention(model)
    cls = get_method("diff-pruning")
    spec = cls(make_config(cls, dict(sparsity=0.01)), model, head).build_phase("l0")
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=1.0, use_cpu=True, report_to="none")
    trainer = PhaseTrainer(model=spec.model, args=args, phase=spec)
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's own clipping of every parameter is off
    clip = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _ClipGroups))
    source = spec.model.source
    clipped = [source.w] + [model.get_parameter(n) for n in head]
    assert {id(p) for p in clip.params} == {id(p) for p in clipped}
    for p in clipped + [source.log_alpha]:
        p.grad = torch.full_like(p, 3.0)
    clip.on_pre_optimizer_step(args, None, None)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in clipped))
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(source.log_alpha.grad, torch.full_like(source.log_alpha, 3.0))


@pytest.mark.parametrize("structured", [False, True])
def test_magnitude_gates_follow_the_schedule_with_the_largest_w(structured):
    """The default target mode: α is never trained, and after each step past the hold exactly
    round(ρ_s·d) gates are open, those of the largest |w|."""
    from diffprune.core.density_control import DensitySchedule
    model = make_tiny("bert")
    cls = get_method("diff-pruning")
    cfg = make_config(cls, dict(sparsity=0.01, structured=structured))
    assert cfg.magnitude_gates
    method = cls(cfg, model, head_names_by_convention(model))
    spec = method.build_phase("l0")
    alpha = spec.groups[1]
    assert alpha.name == "alpha" and alpha.scale(0.5) == 0.0
    spec.plan(100)
    source = spec.model.source
    with torch.no_grad():
        source.w.normal_()
    before = source.log_alpha.clone()
    spec.after_step(0.1)  # inside the hold: the gates are left as they were
    assert torch.equal(source.log_alpha, before)
    schedule, d = DensitySchedule(0.01, cfg.target_hold, cfg.target_reach), method.layout.total
    for progress in (0.3, 0.5, 0.9):
        spec.after_step(progress)
        z = source.gates(True, torch.Generator().manual_seed(1))
        keep = round(schedule(progress) * d)
        assert int((z == 1).sum()) == keep and int((z == 0).sum()) == d - keep
        w = source.w.detach().abs()
        assert float(w[z == 1].min()) >= float(w[z == 0].max())
    method.end_phase("l0")
    assert method.phase_stats["l0"]["nonzero_frac"] == pytest.approx(round(0.01 * d) / d)
    assert method.delta_model.source.indices.numel() == round(0.01 * d)


def test_gate_choice_is_validated():
    cls = get_method("diff-pruning")
    assert not make_config(cls, dict(l0_lambda=1e-7)).magnitude_gates  # the paper's mode learns its gates
    assert not make_config(cls, dict(gate_choice="learned")).magnitude_gates
    for bad in (dict(gate_choice="magnitude", l0_lambda=1e-7), dict(gate_choice="random"),
                dict(alpha_lr=0.1), dict(max_shift=0.5)):
        with pytest.raises(DiffpruneError):
            make_config(cls, bad)


def test_a_magnitude_state_projected_above_its_sparsity_adds_the_last_closed_entries():
    """Projecting a hard-gated L0 state to twice its sparsity keeps every open entry, then the closed
    ones of largest |w| (the last the schedule closed), not the first by index."""
    torch.manual_seed(0)
    model = make_tiny("bert")
    cls = get_method("diff-pruning")
    method = cls(make_config(cls, dict(sparsity=0.02)), model, head_names_by_convention(model))
    source = method.build_phase("l0").model.source
    d = source.w.numel()
    with torch.no_grad():
        source.w.normal_()
    mask = torch.zeros(d, dtype=torch.bool)
    mask[torch.randperm(d)[: round(0.01 * d)]] = True
    source.set_gates_(mask)  # half the final count open, as a 1% run would leave
    method.end_phase("l0")
    kept = torch.zeros(d, dtype=torch.bool)
    kept[method.delta_model.source.indices] = True
    assert int(kept.sum()) == round(0.02 * d) and bool(kept[mask].all())
    closed = source.w.detach().abs().masked_fill(mask, -1.0)
    assert torch.equal(kept & ~mask, closed >= closed.topk(round(0.02 * d) - int(mask.sum())).values.min())
