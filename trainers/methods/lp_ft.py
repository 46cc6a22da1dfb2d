"""LP-FT: linear probe first, then fine-tune everything from the probed head.

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022, https://arxiv.org/abs/2202.10054. A good head before
end-to-end training means smaller early gradients into the image tower, so the
pre-trained features move less. The FT phase usually takes a smaller learning rate
than plain FT (the authors' ImageNet sweep was 10x lower).

Each phase checkpoints under its own name ("lp", then the main phase): a run that
stops in either phase resumes there (a stop during FT does not redo the probe).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from trainers.methods import HEAD, IMAGE_TOWER, FitContext, Fitted, Method, StartPoint, register
from trainers.methods._common import TWO_STEPS, check_grad_checkpointing
from trainers.methods.ft import FTOptions, fine_tune
from trainers.methods.lp import LPOptions, probe
from trainers.train_loop import MAIN_PHASE


@dataclass(frozen=True)
class LPFTOptions(FTOptions):
    """FT-phase options are the plain keys (lr, epochs, ...); the probe's are `lp_*`."""

    lp_lr: float = 1e-3
    lp_epochs: int = 10
    lp_batch_size: int = 128
    lp_weight_decay: float = 0.1
    lp_warmup_steps: int = 500

    def __post_init__(self):
        super().__post_init__()
        self.lp_options()  # the probe's options are checked like LP's own

    def lp_options(self) -> LPOptions:
        return LPOptions(lr=self.lp_lr, epochs=self.lp_epochs, batch_size=self.lp_batch_size,
                         weight_decay=self.lp_weight_decay, warmup_steps=self.lp_warmup_steps,
                         grad_clip=self.grad_clip)

    def ft_options(self) -> FTOptions:
        names = {f.name for f in dataclasses.fields(FTOptions)}
        return FTOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def fit(start: StartPoint, options: LPFTOptions, ctx: FitContext) -> Fitted:
    resume = ctx.hooks.resume_state
    phase = resume.get("phase") if resume else None
    model = copy.deepcopy(start.zero_shot)
    check_grad_checkpointing(model, options.grad_checkpointing)   # before the probe runs
    if phase != MAIN_PHASE:  # a resumed FT phase restores the probed head from its checkpoint
        model.head = probe(start, options.lp_options(), ctx,
                           ctx.hooks.for_phase("lp", resume if phase == "lp" else None))
    fine_tune(model, options.ft_options(), ctx,
              ctx.hooks.for_phase(MAIN_PHASE, resume if phase == MAIN_PHASE else None))
    return Fitted(model)


register(Method(name="lp_ft", options=LPFTOptions, fit=fit,
                trains=frozenset({HEAD, IMAGE_TOWER}), needs_train_features=True,
                batch_size_options=("batch_size", "lp_batch_size"),
                smoke={**TWO_STEPS, "lp_epochs": 1, "lp_batch_size": 8, "lp_warmup_steps": 1},
                paper="https://arxiv.org/abs/2202.10054"))
