"""Diff Pruning (Guo, Rush & Kim, ACL 2021): a learned sparse diff over a frozen pretrained model.

Phases: `l0` trains δ = z ⊙ w with Hard-Concrete gates and the penalty λ·E‖δ‖₀ (α in its own optimizer
group, AdamW at a constant learning rate); at its end the gates are sampled once, δ is projected onto the
L0 ball (exactly t·d entries kept by |δ|), and `fixed_mask` finetunes those entries with the mask fixed.
`--structured` adds one group gate per pretrained tensor. The task head trains densely throughout.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method diff-pruning --structured --sparsity 0.005 --output-dir runs/rte-dp
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.diff_vector import FixedMaskDiff, L0Diff
from ..core.projection import project_l0
from ..errors import DiffpruneError
from ..sparse_model import DeltaModel, layout_for, select_parameters
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register
from .sparse import FixedMaskMixin


@dataclass
class DiffPruningConfig(MethodConfig):
    sparsity: float = 0.005     # t: share of the diff-pruned entries kept by the projection, in (0, 1]
    structured: bool = False    # one extra group gate per pretrained tensor
    # λ, weight of E‖δ‖₀ in the loss: the paper's value. Its pull on each α is λ·∂P(gate open)/∂α,
    # whatever d is; on a few hundred steps it shuts gates faster than the task can hold them, and
    # 4e-8 fitted RTE better with MiniLM (README, "Short budgets").
    l0_lambda: float = 1.25e-7
    l0_epochs: float = 3.0      # epochs of the L0 phase (`epochs` is the fixed-mask phase)
    # Share of the L0 phase over which λ ramps linearly from 0. Not in the paper: at the start w = 0, so α
    # gets no task gradient and Adam drives every α down at alpha_lr per step; on short budgets the gates
    # close before w has learnt anything (seen on MRPC: E‖δ‖₀/d 99% → 3% in 80 steps, dev at majority).
    # The ramp alone slows this little (see alpha_hold); it stays for the runs made with it.
    l0_warmup: float = 0.0
    # Share of the L0 phase during which α is held (learning rate 0): w and the head train with every gate
    # open, and the gates start to close only after. Not in the paper. The λ ramp above does not delay the
    # closing much, because AdamW normalises α's steps: even a small λ moves every α by ~alpha_lr per step
    # while w is still ~0 and gives α no task gradient (seen on RTE: E‖δ‖₀/d 96% → 10% by step 60 of a
    # 78-step ramp). Holding α is the warm-up that survives Adam.
    alpha_hold: float = 0.0
    alpha_lr: float = 0.1       # constant AdamW learning rate of the gate parameters α
    alpha_eps: float = 1e-8     # AdamW eps of α: with Adam it sets the sparsity reached as much as λ does
    alpha_init: float = 5.0     # α₀: sigmoid(5)·3 − 1.5 > 1, so every gate starts fully open
    left: float = -1.5          # l, the stretch interval's lower end
    right: float = 1.5          # r, its upper end
    fixed_lr: float | None = None  # learning rate of the fixed-mask phase (None: lr)
    include: list[str] = field(default_factory=list)  # patterns of parameters to diff-prune (default: all)
    exclude: list[str] = field(default_factory=list)  # patterns to leave frozen
    gate_used_rows: bool = True  # gate only the word-embedding rows each batch uses (same result, faster)
    seed: int = 0               # seed of the once-sampled final mask

    def __post_init__(self):
        super().__post_init__()
        self.check_sparsity(self.sparsity)
        if not (self.left < 0.0 < self.right):
            raise DiffpruneError(f"the stretch interval needs left < 0 < right, got {self.left}, {self.right}")
        if self.l0_lambda < 0:
            raise DiffpruneError(f"l0_lambda must be >= 0, got {self.l0_lambda}")
        self.check_positive(alpha_lr=self.alpha_lr, l0_epochs=self.l0_epochs)
        if not 0.0 <= self.l0_warmup < 1.0:
            raise DiffpruneError(f"l0_warmup is a share of the L0 phase in [0, 1), got {self.l0_warmup}")
        if not 0.0 <= self.alpha_hold < 1.0:
            raise DiffpruneError(f"alpha_hold is a share of the L0 phase in [0, 1), got {self.alpha_hold}")


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
        self.names = select_parameters(model, head_names, config.include, config.exclude)
        self.layout = layout_for(model, self.names)
        self.delta_model: DeltaModel | None = None
        self.phase_stats: dict[str, dict[str, float]] = {}  # per phase, recorded in metrics.json

    def build_phase(self, phase: str) -> PhaseSpec:
        c = self.config
        if phase == "l0":
            source = L0Diff(self.layout, c.structured, c.alpha_init, c.left, c.right)
            source.grads_in_place = True  # the trainer calls loss.backward(); see KeptGrads
            self.delta_model = DeltaModel(self.model, source, self.head_names, c.gate_used_rows)
            alphas = [source.log_alpha] + ([source.group_log_alpha] if c.structured else [])
            groups = [ParamGroup("diff", [source.w], c.lr, c.weight_decay),
                      ParamGroup("alpha", alphas, c.alpha_lr, 0.0, schedule="constant", eps=c.alpha_eps,
                                 hold=c.alpha_hold),
                      self.head_group()]
            d = float(self.layout.total)
            return PhaseSpec("l0", self.delta_model, groups, c.l0_epochs,
                             penalty=lambda progress=1.0: self.l0_weight(progress) * source.expected_l0(),
                             stats=lambda: {"expected_l0_frac": float(source.expected_l0().detach()) / d,
                                            "gate_open_frac": source.open_fraction()})
        if phase == "fixed_mask":
            return self.fixed_mask_phase(c.fixed_lr or c.lr, c.epochs)
        raise ValueError(phase)

    def l0_weight(self, progress: float) -> float:
        """λ at `progress` (share of the L0 phase done): ramped from 0 over the first l0_warmup of it."""
        c = self.config
        if c.l0_warmup <= 0.0 or progress >= c.l0_warmup:
            return c.l0_lambda
        return c.l0_lambda * progress / c.l0_warmup

    def end_phase(self, phase: str) -> None:
        if phase != "l0":
            return
        source = self.delta_model.source
        source.grads_in_place = False  # frees the kept gradient buffers before the projection's temporaries
        generator = torch.Generator().manual_seed(self.config.seed)
        delta = source.final_delta(generator)  # u sampled once: many entries exactly 0
        self.phase_stats["l0"] = {"nonzero_frac": float((delta != 0).float().mean()),
                                  "expected_l0_frac": float(source.expected_l0().detach()) / self.layout.total}
        idx, values = project_l0(delta, self.config.sparsity, tiebreak=source.keep_probability())
        self.set_fixed_mask(FixedMaskDiff(self.layout, idx, values))
