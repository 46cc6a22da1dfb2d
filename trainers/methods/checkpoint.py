"""A fine-tuned model made elsewhere, loaded instead of trained, so a sweep can ensemble
existing checkpoints (as the WiSE-FT reference code's `--load zs.pt,ft.pt` does): the
zero-shot side is the sweep's `model:` (a pretrained tag or a file), the fine-tuned side
is this method's `path`.

Accepted files: an `orch export` file (its head is used as it is), or a plain open_clip
state dict of the same architecture, bare or under a "state_dict" key (its zero-shot
head is built from its own text tower, as for FLYP). Loaded with weights_only=True.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainers.methods import (HEAD, IMAGE_TOWER, TEXT_TOWER, FitContext, Fitted, Method,
                              StartPoint, rebuild_head, register, text_tower_state)
from trainers.models import ImageClassifier


@dataclass(frozen=True)
class CheckpointOptions:
    path: str

    def __post_init__(self):
        path = Path(self.path).expanduser().resolve()   # on the driver: trials run elsewhere
        if not path.is_file():
            raise ValueError(f"path: file {path} does not exist")
        object.__setattr__(self, "path", str(path))


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], nn.Linear | None]:
    """(open_clip state dict, the file's classification head or None)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    head = None
    if isinstance(data, dict) and "head_weight" in data:
        weight, bias = data["head_weight"], data.get("head_bias")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    state = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    # weights saved from a DistributedDataParallel or compiled model carry a prefix
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, head


def fit(start: StartPoint, options: CheckpointOptions, ctx: FitContext) -> Fitted:
    state, head = read_checkpoint(options.path)
    model = copy.deepcopy(start.clip.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{options.path} does not fit {start.clip.arch}: {first}") from None
    model = model.to(ctx.device).eval()
    if head is None:
        head = rebuild_head(start.clip, model, start.classnames, start.templates, ctx.device)
    elif head.weight.shape[0] != len(start.classnames):
        raise ValueError(f"{options.path}: its head has {head.weight.shape[0]} classes, the "
                         f"benchmark {len(start.classnames)}")
    return Fitted(ImageClassifier(model.visual, head.to(ctx.device)).eval(),
                  text_tower_state(model))


# It replaces whatever the file holds: image tower, text tower and head.
register(Method(name="checkpoint", options=CheckpointOptions, fit=fit,
                trains=frozenset({HEAD, IMAGE_TOWER, TEXT_TOWER}),
                paper="https://arxiv.org/abs/2109.01903"))
