"""The searcher: Optuna proposes the trials of a sweep's searched entries (a range in a
method entry's grid, `search: {searcher: optuna}`), in rounds of as many trials as run
at once. Each round trains like any other trials (Ray Tune, journal, MLflow); each
trial's fitted model is scored on ID validation (`search.objectives`) and the next round
is proposed from every score so far.

Why rounds, and not Ray Tune's OptunaSearch inside one Tuner: orch names each trial
before it runs (the journal, MLflow, `--resume`, the feature cache and the ensemble stage
key on the name), and a searcher inside a Tuner proposes where no name can be fixed
ahead. Here a round's proposals are written to the journal before they train, and the
study is rebuilt from the journal before every round with a seed of its own
(`search.seed` + the round's first trial number): a resumed sweep trains the same
trials and proposes the same next ones as a sweep that was never interrupted.

Proposed floats are rounded to 3 significant digits (readable trial names; the
difference is below any learning rate's noise) and told to the study as rounded.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution,
                                  FloatDistribution, IntDistribution)
from optuna.trial import TrialState, create_trial

from orchestrator.spec.types import OBJECTIVES, MethodEntry, Range, SearchSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIGITS = 3          # significant digits of a proposed float


def distributions(entry: MethodEntry) -> dict[str, BaseDistribution]:
    """The entry's search space: each range a float or int distribution, each list of
    values a categorical one."""
    out: dict[str, BaseDistribution] = {}
    for key, values in entry.grid.items():
        if isinstance(values, Range):
            out[key] = (IntDistribution(int(values.low), int(values.high))
                        if values.kind == "int" else
                        FloatDistribution(values.low, values.high, log=values.kind == "loguniform"))
        else:
            out[key] = CategoricalDistribution(list(values))
    return out


def _rounded(value: Any, space: BaseDistribution) -> Any:
    if not isinstance(space, FloatDistribution):
        return value
    digits = DIGITS - 1 - math.floor(math.log10(abs(value))) if value else 0
    return min(max(round(value, digits), space.low), space.high)


def study_of(entry: MethodEntry, search: SearchSpec, proposals: list[dict[str, Any]],
             scores: list[list[float] | None]) -> optuna.Study:
    """The entry's study as the journal has it: each proposal with its scores (a complete
    trial), or still training (None: a running one, so no round proposes it twice)."""
    space = distributions(entry)
    sampler = optuna.samplers.TPESampler(
        seed=search.seed + len(proposals),
        n_startup_trials=search.startup_trials if search.startup_trials is not None else 10)
    study = optuna.create_study(directions=[OBJECTIVES[o] for o in search.objectives],
                                sampler=sampler)
    for params, values in zip(proposals, scores):
        study.add_trial(create_trial(params=params, distributions=space, values=values,
                                     state=TrialState.COMPLETE if values is not None
                                     else TrialState.RUNNING))
    return study


def propose(entry: MethodEntry, search: SearchSpec, proposals: list[dict[str, Any]],
            scores: list[list[float] | None], k: int) -> list[dict[str, Any]]:
    """The next k trials of a searched entry, from every proposal and score so far."""
    study = study_of(entry, search, proposals, scores)
    space = distributions(entry)
    out = []
    for _ in range(k):      # left running: TPE models completed trials only
        trial = study.ask(space)
        out.append({key: _rounded(trial.params[key], space[key]) for key in entry.grid})
    return out


def scores_of(record: dict[str, Any] | None, search: SearchSpec) -> list[float] | None:
    """A trial's objectives in the search's order, from its journal record (None while it
    has none: not finished)."""
    objectives = (record or {}).get("objectives")
    if not objectives:
        return None
    return [float(objectives[name]) for name in search.objectives]


def best_trials(study: optuna.Study) -> list[int]:
    """Numbers of the study's best trials: the Pareto front of several objectives."""
    return [t.number for t in study.best_trials]
