"""Model soups: the weight average of fine-tuned models.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482.

The members are the trials of one method entry (`of`: its label), fine-tuned from the
same pre-trained model (another seed, learning rate, augmentation):

    uniform:  theta = (1/k) sum_i theta_i
    greedy:   sort the members by ID validation accuracy, best first; start from the
              best; add the next member to the soup if the soup's ID validation accuracy
              does not drop (the paper's ">="), else leave it out.

Greedy never ends below its best member on ID validation (it starts there and only
takes steps that do not lower it). It may keep that one model alone: with members
whose fine-tuning moved them into different basins (large learning rates, few shared
steps), every average is worse. The trial's history says how many members the soup
kept (`soup_size`, of `soup_candidates`), with the soup's ID validation accuracy.
A WiSE-FT grid between the zero-shot model and the soup is then an ensemble like any
other (`ensembles: [{name: wise_ft, methods: [<this entry's label>]}]`).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.evaluate import predict
from trainers.methods import (HEAD, IMAGE_TOWER, TEXT_TOWER, FitContext, Fitted, Method,
                              StartPoint, register)
from trainers.methods._merge import members_of, merge_fitted, uniform_average
from trainers.train_loop import MAIN_PHASE

KINDS = ("uniform", "greedy")


@dataclass(frozen=True)
class SoupOptions:
    of: str                          # the method entry (its label) whose trials are the members
    kind: str = "greedy"             # the paper's best; uniform is the plain average
    eval_batch_size: int = 256       # greedy's ID validation passes

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


def val_accuracy(fitted: Fitted, ctx: FitContext, batch_size: int) -> float:
    logits, labels = predict(fitted.classifier, ctx.val_set, ctx.device, batch_size=batch_size)
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


def greedy_order(accuracies: list[float]) -> list[int]:
    """Members best first; ties keep sweep order (a stable sort)."""
    return sorted(range(len(accuracies)), key=lambda i: -accuracies[i])


def fit(start: StartPoint, options: SoupOptions, ctx: FitContext) -> Fitted:
    members = members_of(ctx)
    if options.kind == "uniform" or len(members) == 1:
        soup, kept = merge_fitted(start, members, uniform_average), len(members)
        metrics = {"soup_size": float(kept), "soup_candidates": float(len(members))}
        if ctx.val_set is not None:
            metrics["soup_val_acc"] = val_accuracy(soup, ctx, options.eval_batch_size)
    else:
        if ctx.val_set is None:
            raise ValueError("a greedy soup needs the ID validation set (FitContext.val_set)")
        accuracies = [val_accuracy(m, ctx, options.eval_batch_size) for m in members]
        order = greedy_order(accuracies)
        ingredients = [members[order[0]]]
        soup, best = ingredients[0], accuracies[order[0]]
        for i in order[1:]:
            candidate = merge_fitted(start, ingredients + [members[i]], uniform_average)
            accuracy = val_accuracy(candidate, ctx, options.eval_batch_size)
            if accuracy >= best:
                ingredients.append(members[i])
                soup, best = candidate, accuracy
        if len(ingredients) == 1:     # the best member alone, as a model of its own
            soup = merge_fitted(start, ingredients, uniform_average)
        metrics = {"soup_size": float(len(ingredients)),
                   "soup_candidates": float(len(members)), "soup_val_acc": best}
    if ctx.hooks.on_epoch_end is not None:       # the trial's one history row
        ctx.hooks.on_epoch_end(0, metrics, {"phase": MAIN_PHASE})
    return soup


def notes(history: list[dict]) -> list[str]:
    """A greedy soup that kept one of several members is that member: say so."""
    last = history[-1] if history else {}
    if last.get("soup_size") == 1 and last.get("soup_candidates", 1) > 1:
        return [f"the greedy soup kept 1 of {int(last['soup_candidates'])} members (adding "
                "any other lowered ID validation accuracy): it is the best member alone"]
    return []


# What it changes is what its members changed: every part, declared.
register(Method(name="soup", options=SoupOptions, fit=fit, merges=True, notes=notes,
                trains=frozenset({HEAD, IMAGE_TOWER, TEXT_TOWER}),
                paper="https://arxiv.org/abs/2203.05482"))
