"""LiNeS: layer-increasing network scaling of the fine-tuning delta.

Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", ICLR 2025, https://arxiv.org/abs/2410.17146.  With tau = theta_ft - theta_zs,

    theta(l) = theta_zs(l) + lambda(l) * tau(l),   lambda(l) = alpha + beta * (l-1)/(L-1),

l = 1..L over the residual blocks in depth order, so shallow blocks stay near the
pre-trained weights (general features) and deep ones keep the task-specific update.

Layers. The image tower's residual blocks: open_clip ViT `transformer.resblocks.<i>`,
ModifiedResNet `layer<s>.<b>` (stage, then block, numerically). Parameters before the
first block (the stem: patch/conv stem, class and positional embeddings, `ln_pre`) take
lambda(1) = alpha; everything after the last block (final norm, projection, attention
pool) and the classification head take lambda(L) = alpha + beta, as the output side of the
network. (The authors' code gives every parameter outside the blocks alpha, but their
head is never edited; orch's head is trained, so it goes with the deepest block.) A tower
with one block has lambda = alpha everywhere. Where the fine-tuned model has its own text
tower (FLYP, CaRot), its delta is scaled over ITS blocks in the same way (token and
positional embeddings: lambda(1); final norm, text projection, logit scale: lambda(L)),
while the head, as in `wise_ft`, mixes the two classifiers' heads. Floating buffers
(BatchNorm statistics) follow their layer; integer buffers come from the zero-shot model.

Endpoints: (alpha, beta) = (1, 0) is the fine-tuned model and (0, 0) the zero-shot model,
tensor for tensor (returned, not recomputed).

Defaults. In the single-task setting the paper keeps the last block's full update,
beta = 1 - alpha, and the authors' code sweeps alpha over 0, 0.1, ..., 1 (`evaluate_task_vector`
of github.com/wang-kee/LiNeS, choosing by a target/control trade-off on validation). A
sweep's points are the product of the grids, which cannot express beta = 1 - alpha, so the
defaults are the 5 x 5 product of 0, 0.25, 0.5, 0.75, 1: it holds five points of the
paper's line (alpha + beta = 1, including (1, 0), the fine-tuned model), the zero-shot
model (0, 0), and the schedules between them (alpha + beta < 1, like WiSE-FT plus
layer scaling) and beyond the fine-tuned update in deep layers (alpha + beta > 1).
Both grids are limited to [0, 1]: beta < 0 would make the scaling decrease with depth.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from trainers.ensembles import (FINE_TUNED_MEMBER, ZERO_SHOT_MEMBER, Coefficients,
                                WeightEnsemble, check_grid, register)
from trainers.methods import Fitted

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)

# open_clip's residual blocks, by key inside a tower; CustomTextCLIP nests its text tower
# under `text.`, so the text pattern allows that prefix.
_TRANSFORMER_BLOCK = re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\.")
_RESNET_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")
# Parts before the first block, by their top-level name (a text tower's `text.` stripped).
_STEM = frozenset({"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",      # ModifiedResNet
                   "class_embedding", "positional_embedding", "ln_pre",  # ViT (and text)
                   "patchnorm_pre_ln", "token_embedding"})

IMAGE_PREFIX = "image_encoder."      # ImageClassifier's tower; its head is `head.`


@dataclass(frozen=True)
class LinesOptions:
    alpha: tuple[float, ...] = DEFAULT_GRID
    beta: tuple[float, ...] = DEFAULT_GRID

    def __post_init__(self):
        check_grid("alpha", self.alpha, 0.0, 1.0)
        check_grid("beta", self.beta, 0.0, 1.0)


def _block_of(key: str) -> tuple[int, ...] | None:
    """The block a tower key lies in, as a sortable (stage, block) or (block,); else None."""
    match = _TRANSFORMER_BLOCK.match(key) or _RESNET_BLOCK.match(key)
    return tuple(int(g) for g in match.groups()) if match else None


def layer_depths(keys, what: str) -> dict[str, float]:
    """Per key of one tower, (l - 1)/(L - 1) in [0, 1]: 0 for the stem and the first
    block, 1 for the last block and everything after it. `what` names the tower in the
    error raised when it has no block orch knows how to order."""
    blocks = sorted({b for k in keys if (b := _block_of(k)) is not None})
    if not blocks:
        raise ValueError(f"LiNeS cannot order the residual blocks of {what}: it knows open_clip's "
                         "transformer.resblocks.<i> (ViT, text) and layer<s>.<b> (ModifiedResNet)")
    rank = {b: i for i, b in enumerate(blocks)}
    last = max(len(blocks) - 1, 1)         # one block: depth 0, lambda = alpha everywhere
    depths = {}
    for key in keys:
        block = _block_of(key)
        if block is not None:
            depths[key] = rank[block] / last
        else:
            top = key.removeprefix("text.").split(".")[0]
            depths[key] = 0.0 if top in _STEM else 1.0
    return depths


def classifier_depths(keys, what: str) -> dict[str, float]:
    """Depths of an ImageClassifier's keys: its tower's, and 1 for the head."""
    tower = [k[len(IMAGE_PREFIX):] for k in keys if k.startswith(IMAGE_PREFIX)]
    depths = {IMAGE_PREFIX + k: d for k, d in layer_depths(tower, what).items()}
    return {k: depths.get(k, 1.0) for k in keys}


def scale_deltas(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                 depths: dict[str, float], alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """zs + (alpha + beta * depth) * (ft - zs) per floating tensor; integer tensors from
    zero-shot. lambda 0 and 1 return the members' own values (no rounding), so (1, 0)
    and (0, 0) reproduce the members exactly."""
    if zero_shot.keys() != fine_tuned.keys():
        missing = sorted(zero_shot.keys() ^ fine_tuned.keys())
        raise ValueError(f"state dicts differ in keys: {missing[:5]}")
    mixed = {}
    for key, zs in zero_shot.items():
        ft = fine_tuned[key]
        if zs.shape != ft.shape:
            raise ValueError(f"{key}: shape {tuple(zs.shape)} vs {tuple(ft.shape)}")
        lam = alpha + beta * depths[key]
        if not zs.is_floating_point() or lam == 0.0:
            mixed[key] = zs.clone()
        elif lam == 1.0:
            mixed[key] = ft.clone()
        else:
            mixed[key] = torch.lerp(zs, ft.to(zs.dtype), lam)     # zs + lam * (ft - zs)
    return mixed


def mix(zero_shot: Fitted, fine_tuned: Fitted, options: LinesOptions,
        point: Coefficients) -> Fitted:
    alpha, beta = point["alpha"], point["beta"]
    zs_state = zero_shot.classifier.state_dict()
    what = f"the image tower {type(zero_shot.classifier.image_encoder).__name__}"
    classifier = copy.deepcopy(zero_shot.classifier)
    classifier.load_state_dict(scale_deltas(zs_state, fine_tuned.classifier.state_dict(),
                                            classifier_depths(zs_state, what), alpha, beta))
    text = None
    if fine_tuned.text_tower is not None:
        depths = layer_depths(list(zero_shot.text_tower), "the text tower")
        text = scale_deltas(zero_shot.text_tower, fine_tuned.text_tower, depths, alpha, beta)
    return Fitted(classifier, text)


def endpoint(point: Coefficients) -> str | None:
    """beta 0 scales every layer alike: alpha 1 is the fine-tuned model, 0 the zero-shot."""
    if point["beta"] != 0.0:
        return None
    return {0.0: ZERO_SHOT_MEMBER, 1.0: FINE_TUNED_MEMBER}.get(point["alpha"])


register(WeightEnsemble(name="lines", options=LinesOptions, coefficients=("alpha", "beta"),
                        mix=mix, endpoint=endpoint, paper="https://arxiv.org/abs/2410.17146"))
