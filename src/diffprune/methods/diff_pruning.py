"""Diff Pruning (Guo, Rush & Kim, ACL 2021): a learned sparse diff over a frozen pretrained model.

Phases: `l0` trains δ = z ⊙ w with Hard-Concrete gates (α in its own optimizer group, AdamW at a constant
learning rate); at its end the gates are sampled once, δ is projected onto the L0 ball (exactly t·d
entries kept by |δ|), and `fixed_mask` finetunes those entries with the mask fixed. `--structured` adds
one group gate per pretrained tensor. The task head trains densely throughout.

How the gates close is the departure from the paper, by default. The paper adds λ·E‖δ‖₀ to the loss
with a fixed λ, and where the gates end depends on λ, the budget and Adam; the projection then removes
the rest. By default the phase aims at t itself (`core/density_control.py`): the gates stay open for the
first quarter (w learns densely), the density then falls from 1 to t on a cubic schedule, and the last
quarter re-fits w at density t, so the projection removes nothing. Which entries stay open along the way
is `gate_choice`: by default those of largest |w| (gradual magnitude pruning of the diff, the gates made
hard after every step), or with `gate_choice=learned` Hard-Concrete gates trained on the task loss and
shifted after every step to keep E‖δ‖₀/d on the schedule. The default is the magnitudes because on the
shared GLUE tasks at a few epochs the learned gates closed before the model had learnt and left masks the
fixed-mask phase could not recover from (benchmarks/RESULTS.md, sessions 15-17). `--l0-lambda X` is the
paper's fixed-λ mode, with learned gates.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method diff-pruning --structured --sparsity 0.005 --output-dir runs/rte-dp
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from ..core.density_control import DensitySchedule, GateShift, top_magnitude_mask
from ..core.diff_vector import FixedMaskDiff, L0Diff
from ..core.projection import project_l0
from ..errors import DiffpruneError
from ..sparse_model import DeltaModel, layout_for, select_parameters
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register
from .sparse import FixedMaskMixin, default_fixed_lr

PAPER_ALPHA_LR = 0.1  # the paper's constant AdamW learning rate of α
L0_STATE_FILE = "l0_state.safetensors"
HEAD_PREFIX = "head."



@dataclass
class DiffPruningConfig(MethodConfig):
    sparsity: float = 0.005     # t: share of the diff-pruned entries kept by the projection, in (0, 1]
    structured: bool = False    # one extra group gate per pretrained tensor
    # λ, weight of E‖δ‖₀ in the loss. None (the default): the L0 phase aims at `sparsity` itself: after
    # each step the gates are shifted so that E‖δ‖₀/d follows a schedule from 1 down to t, and no λ is
    # needed (core/density_control.py). A number: the paper's mode, λ fixed all phase long (the paper used
    # 1.25e-7 for BERT-large), and the projection removes whatever the gates leave above t.
    l0_lambda: float | None = None
    l0_epochs: float = 3.0      # epochs of the L0 phase (`epochs` is the fixed-mask phase)
    # Target mode: which entries stay open as the density falls. "magnitude": after every step from the
    # hold's end, exactly round(ρ_s·d) gates are open, those of the largest |w|, the others closed (α is
    # not trained; structured: a group gate closes iff its tensor keeps no entry). "learned": the gates
    # are trained on the task loss and every α is shifted after each step to keep E‖δ‖₀/d on the schedule.
    # None: "magnitude" in target mode; the paper's fixed-λ mode always learns its gates.
    gate_choice: str | None = None
    # Target mode: the density schedule. Gates are held open for the first `target_hold` of the L0 phase
    # (with w = 0 they get no task gradient, so any penalty would close them at random), the density falls
    # to t by `target_reach`, and the rest of the phase re-fits w at density t.
    target_hold: float = 0.25
    target_reach: float = 0.75
    # Target mode: w's learning rate rises with the closing gates, geometrically in the density, from lr to
    # the fixed-mask phase's rate (reached with the density t) and stays there to the end of the phase (no
    # decay: the fixed-mask phase that follows decays it), so the surviving entries can take over what the
    # closed ones carried. False: lr with the usual linear decay, as in the paper.
    lr_follows_density: bool = True
    # Target mode: the largest shift of the gates' α per step (None: enough to close a gate from α₀ in half
    # the density ramp, so short budgets reach t and long ones move gently).
    max_shift: float | None = None
    # Paper mode only: share of the L0 phase over which λ ramps linearly from 0 (not in the paper; AdamW
    # normalises α's steps, so a ramp delays the closing little).
    l0_warmup: float = 0.0
    # Paper mode only: share of the L0 phase during which α is held (learning rate 0), so w learns with
    # every gate open first. Target mode holds the gates through `target_hold` instead.
    alpha_hold: float = 0.0
    # Constant AdamW learning rate of the gate parameters α. None: the paper's 0.1 with a fixed λ; in target
    # mode the largest gate shift per step, so that a gate the task keeps pushing open (Adam moves it by
    # up to its learning rate) can hold against the shift, and one it does not gets closed.
    alpha_lr: float | None = None
    alpha_eps: float = 1e-8     # AdamW eps of α: with Adam it sets the sparsity reached as much as λ does
    alpha_init: float = 5.0     # α₀: sigmoid(5)·3 − 1.5 > 1, so every gate starts fully open
    left: float = -1.5          # l, the stretch interval's lower end
    right: float = 1.5          # r, its upper end
    # Learning rate of the fixed-mask phase. None: lr / √t, so that the kept entries' Adam steps have the
    # norm dense finetuning's have (shared with the other sparse methods: `sparse.default_fixed_lr`).
    fixed_lr: float | None = None
    include: list[str] = field(default_factory=list)  # patterns of parameters to diff-prune (default: all)
    exclude: list[str] = field(default_factory=list)  # patterns to leave frozen
    gate_used_rows: bool = True  # gate only the word-embedding rows each batch uses (same result, faster)
    # Keep the L0 phase's end state (w, α, head: 3·d floats) in phases/l0/, so that runs at other
    # sparsities can reuse it through from_l0 instead of training their own L0 phase (`diffprune sweep`).
    keep_l0_state: bool = False
    from_l0: str | None = None  # a run directory with a kept L0 state: project it, run only the fixed mask
    seed: int = 0               # seed of the once-sampled final mask

    def __post_init__(self):
        super().__post_init__()
        self.check_sparsity(self.sparsity)
        if not (self.left < 0.0 < self.right):
            raise DiffpruneError(f"the stretch interval needs left < 0 < right, got {self.left}, {self.right}")
        self.check_finite(l0_lambda=self.l0_lambda, alpha_init=self.alpha_init, fixed_lr=self.fixed_lr,
                          max_shift=self.max_shift)
        if self.l0_lambda is not None and self.l0_lambda < 0:
            raise DiffpruneError(f"l0_lambda must be >= 0, got {self.l0_lambda}")
        self.check_positive(l0_epochs=self.l0_epochs)
        for key in ("alpha_lr", "max_shift", "fixed_lr"):
            if getattr(self, key) is not None:
                self.check_positive(**{key: getattr(self, key)})
        if not 0.0 <= self.l0_warmup < 1.0:
            raise DiffpruneError(f"l0_warmup is a share of the L0 phase in [0, 1), got {self.l0_warmup}")
        if not 0.0 <= self.alpha_hold < 1.0:
            raise DiffpruneError(f"alpha_hold is a share of the L0 phase in [0, 1), got {self.alpha_hold}")
        if not 0.0 <= self.target_hold < self.target_reach <= 1.0:
            raise DiffpruneError("the density schedule needs 0 <= target_hold < target_reach <= 1, got "
                                 f"target_hold={self.target_hold}, target_reach={self.target_reach}")
        if self.gate_choice not in (None, "magnitude", "learned"):
            raise DiffpruneError(f"gate_choice must be magnitude or learned, got {self.gate_choice!r}")
        if self.gate_choice == "magnitude" and not self.targeted:
            raise DiffpruneError("gate_choice=magnitude follows the target schedule; the paper's fixed-λ mode "
                                 "(l0_lambda set) learns its gates: drop one of the two")
        if self.magnitude_gates and (self.alpha_lr is not None or self.max_shift is not None):
            raise DiffpruneError("alpha_lr and max_shift steer learned gates; with gate_choice=magnitude the "
                                 "gates follow |w| (set gate_choice=learned to use them)")
        if self.targeted and (self.alpha_hold or self.l0_warmup):
            raise DiffpruneError("alpha_hold and l0_warmup belong to the paper's fixed-λ mode (set l0_lambda); "
                                 "the target mode holds the gates through target_hold")

    @property
    def targeted(self) -> bool:
        """True when the L0 phase steers its density to `sparsity` (no fixed λ given)."""
        return self.l0_lambda is None

    @property
    def magnitude_gates(self) -> bool:
        """True when the gates are set from |w| after each step rather than learned."""
        return self.targeted and self.gate_choice != "learned"


@register
class DiffPruning(FixedMaskMixin, Method):
    name = "diff-pruning"
    config_class = DiffPruningConfig
    phases = ("l0", "fixed_mask")

    @classmethod
    def budget(cls, epochs: float) -> dict[str, float]:
        return {"l0_epochs": epochs / 2, "epochs": epochs / 2}

    def __init__(self, config: DiffPruningConfig, model, head_names):
        super().__init__(config, model, head_names)
        if config.from_l0:  # the L0 phase was another run's: this one projects it and finetunes the mask
            self.phases = ("fixed_mask",)
            if not self._l0_state_path().is_file():  # checked here, before the run writes anything
                raise DiffpruneError(f"from_l0: {self._l0_state_path()} does not exist; train that run with "
                                     "keep_l0_state=true first")
        self.names = select_parameters(model, head_names, config.include, config.exclude)
        self.layout = layout_for(model, self.names)
        self.delta_model: DeltaModel | None = None

    def build_phase(self, phase: str) -> PhaseSpec:
        c = self.config
        if phase == "l0":
            source = L0Diff(self.layout, c.structured, c.alpha_init, c.left, c.right)
            source.grads_in_place = True  # the trainer calls loss.backward(); see KeptGrads
            schedule = DensitySchedule(c.sparsity, c.target_hold, c.target_reach) if c.targeted else None
            shift = GateShift(schedule, max_step=1.0) if c.targeted else None
            self.delta_model = DeltaModel(self.model, source, self.head_names, c.gate_used_rows)
            alphas = [source.log_alpha] + ([source.group_log_alpha] if c.structured else [])
            hold = c.target_hold if c.targeted else c.alpha_hold
            alpha_group = ParamGroup("alpha", alphas, c.alpha_lr or PAPER_ALPHA_LR, 0.0, schedule="constant",
                                     eps=c.alpha_eps, hold=hold, clip=False)
            if c.magnitude_gates:  # α is set from |w|, never trained
                alpha_group.scale = lambda progress: 0.0
            diff_group = ParamGroup("diff", [source.w], c.lr, c.weight_decay)
            if c.targeted and c.lr_follows_density:
                end = (c.fixed_lr or default_fixed_lr(c.lr, c.sparsity)) / c.lr
                diff_group.schedule = "constant"
                diff_group.scale = lambda progress: schedule.lr_scale(progress, end)
            groups = [diff_group, alpha_group, self.head_group()]

            def plan(steps: int) -> None:
                # the largest shift per step lets the gates travel from α₀ to −5 (P(open) < 1%) in half
                # the density ramp, whatever the budget
                ramp = max(1.0, schedule.ramp_share() * steps)
                shift.max_step = c.max_shift or 2.0 * (c.alpha_init + 5.0) / ramp
                if c.alpha_lr is None and not c.magnitude_gates:
                    alpha_group.lr = shift.max_step

            def after_step(progress: float) -> None:
                if c.magnitude_gates:
                    self._last = (progress, 0.0)
                    if progress >= schedule.hold:
                        keep = max(1, int(round(schedule(progress) * source.w.numel())))
                        source.set_gates_(top_magnitude_mask(source.w.detach().abs(), keep))
                    return
                amount = shift(progress, source.density())
                source.shift_gates_(amount)
                self._last = (progress, amount)

            def penalty(progress: float = 1.0):
                return self.l0_weight(progress) * source.expected_l0()

            def stats() -> dict[str, float]:
                out = {"expected_l0_frac": source.density(), "gate_open_frac": source.open_fraction()}
                if c.targeted:
                    progress, amount = self._last
                    out.update(density_target=schedule(progress), gate_shift=amount)
                return out

            self._last = (0.0, 0.0)
            if c.targeted:
                return PhaseSpec("l0", self.delta_model, groups, c.l0_epochs, stats=stats, plan=plan,
                                 after_step=after_step, checkpoint_prefixes=(DeltaModel.SOURCE,))
            return PhaseSpec("l0", self.delta_model, groups, c.l0_epochs, penalty=penalty, stats=stats,
                             checkpoint_prefixes=(DeltaModel.SOURCE,))
        if phase == "fixed_mask":
            return self.fixed_mask_phase(c.fixed_lr or default_fixed_lr(c.lr, c.sparsity), c.epochs)
        raise ValueError(phase)

    def l0_weight(self, progress: float) -> float:
        """The paper's mode: λ at `progress` (share of the L0 phase done), ramped over the first l0_warmup."""
        c = self.config
        if c.l0_warmup <= 0.0 or progress >= c.l0_warmup:
            return c.l0_lambda
        return c.l0_lambda * progress / c.l0_warmup

    def end_phase(self, phase: str) -> None:
        if phase != "l0":
            return
        source = self.delta_model.source
        source.grads_in_place = False  # frees the kept gradient buffers before the projection's temporaries
        if self.config.keep_l0_state:
            self.saved_files["l0"] = {L0_STATE_FILE: self._l0_state(source)}
        self._project(source)

    def _l0_state(self, source: L0Diff) -> dict[str, torch.Tensor]:
        state = {"w": source.w.detach().clone(), "log_alpha": source.log_alpha.detach().clone()}
        if source.structured:
            state["group_log_alpha"] = source.group_log_alpha.detach().clone()
        return {**state, **{HEAD_PREFIX + n: t for n, t in self.head_state().items()}}

    def prepare(self, train_dataset, collate) -> None:
        """With `from_l0`: load that run's L0 state and project it to this run's sparsity (no L0 phase here)."""
        if not self.config.from_l0:
            return
        path = self._l0_state_path()
        state = safetensors.torch.load_file(str(path))
        source = L0Diff(self.layout, self.config.structured, self.config.alpha_init, self.config.left,
                        self.config.right)
        expected = {"w": (self.layout.total,), "log_alpha": (self.layout.total,)}
        if self.config.structured:
            expected["group_log_alpha"] = (len(self.layout),)
        for key, shape in expected.items():
            if key not in state or tuple(state[key].shape) != shape:
                raise DiffpruneError(f"from_l0: {path} does not match this model and variant ({key} missing or "
                                     f"of another shape; structured={self.config.structured})")
        with torch.no_grad():
            for key in expected:
                getattr(source, key).copy_(state[key])
        self.load_head({k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})
        self._project(source)

    def _l0_state_path(self) -> Path:
        return Path(self.config.from_l0) / "phases" / "l0" / L0_STATE_FILE

    def _project(self, source: L0Diff) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        delta = source.final_delta(generator)  # u sampled once: many entries exactly 0
        self.phase_stats["l0"] = {"nonzero_frac": float((delta != 0).float().mean()),
                                  "expected_l0_frac": source.density()}
        # ties among δ's zeros (a kept L0 state projected to a sparsity above its own): learned gates rank
        # them by P(open); hard magnitude gates are all alike, so by the |w| each entry had when it closed,
        # the order in which the schedule closed them
        tiebreak = source.w.detach().abs() if self.config.magnitude_gates else source.keep_probability()
        idx, values = project_l0(delta, self.config.sparsity, tiebreak=tiebreak)
        self.set_fixed_mask(FixedMaskDiff(self.layout, idx, values))
