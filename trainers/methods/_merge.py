"""What the merging methods (soups, Model Stock) share: members' state dicts in, one
fitted model out, with the members' own structure (image tower and head; the text tower
where the members trained one)."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from trainers.methods import Fitted, StartPoint

StateMerge = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def members_of(ctx) -> list[Fitted]:
    if ctx.members is None:
        raise ValueError("a merging method needs its members' fitted models (FitContext.members)")
    members = ctx.members()
    if not members:
        raise ValueError("a merging method needs at least one member")
    return members


def merge_fitted(start: StartPoint, members: list[Fitted], merge: StateMerge) -> Fitted:
    """`merge(member tensors, pre-trained tensor) -> tensor` applied to every floating
    tensor of the classifier (image tower and head) and, where the members trained their
    own, of the text tower; integer tensors (BatchNorm's step counts) come from the
    first member. The pre-trained tensor of the classifier is the zero-shot model's."""
    zs_state = start.zero_shot.state_dict()
    states = [m.classifier.state_dict() for m in members]
    merged = copy.deepcopy(members[0].classifier)
    merged.load_state_dict(_merge_states(states, zs_state, merge))
    text = None
    towers = [m.text_tower for m in members]
    if any(t is not None for t in towers):
        if not all(t is not None for t in towers):
            raise ValueError("members differ: some trained their text tower, some did not")
        text = _merge_states(towers, start.fitted().text_tower, merge)
    return Fitted(merged.eval(), text)


def _merge_states(states: list[dict[str, torch.Tensor]], pre: dict[str, torch.Tensor],
                  merge: StateMerge) -> dict[str, torch.Tensor]:
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        tensors = [s[key] for s in states]
        out[key] = merge(tensors, pre[key].to(first.device, first.dtype))
    return out


def uniform_average(tensors: list[torch.Tensor], pre: torch.Tensor) -> torch.Tensor:
    """The members' mean (one member: that member's tensor, exactly)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    return torch.stack(tensors).mean(0)
