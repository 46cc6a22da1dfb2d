"""The searcher's maths without Ray: proposals are a function of what the journal holds
(so a resumed sweep proposes what an uninterrupted one would), lie in their ranges at 3
significant digits, follow the scores they are told, and several objectives give a
Pareto front in the directions the objectives mean."""
from __future__ import annotations

import math

from orchestrator.run.search import best_trials, propose, scores_of, study_of
from orchestrator.spec.types import MethodEntry, Range, SearchSpec
from trainers.methods.ft import FTOptions

ENTRY = MethodEntry("ft", "ft", FTOptions(), {"lr": Range("loguniform", 1e-6, 1e-2),
                                              "seed": [0, 1]})


def search(**changes) -> SearchSpec:
    return SearchSpec(searcher="optuna", **changes)


def test_proposals_depend_only_on_the_journal_and_lie_in_their_ranges():
    first = propose(ENTRY, search(), [], [], 4)
    assert first == propose(ENTRY, search(), [], [], 4)        # a resume proposes the same
    assert first != propose(ENTRY, search(seed=1), [], [], 4)
    for p in first:
        assert 1e-6 <= p["lr"] <= 1e-2 and p["seed"] in (0, 1)
        assert float(f"{p['lr']:.3g}") == p["lr"]                # 3 significant digits
    # the next round, from the journal's state (two told, two still training)
    scores = [[0.5], [0.6], None, None]
    again = propose(ENTRY, search(), first, scores, 2)
    assert again == propose(ENTRY, search(), first, scores, 2)


def test_told_scores_steer_the_search():
    """After 4 random proposals, TPE proposes nearer the learning rate its scores peak at:
    told a peak at lr = 1e-4 (in log space), its next 12 proposals lie nearer 1e-4 than
    when told the same scores upside down (a trough there)."""
    entry = MethodEntry("ft", "ft", FTOptions(), {"lr": Range("loguniform", 1e-6, 1e-2)})
    spec = search(startup_trials=4)

    def mean_distance(sign: float) -> float:
        proposals, scores = [], []
        for _ in range(16):                    # rounds of one, as with one trial at a time
            (p,) = propose(entry, spec, proposals, scores, 1)
            proposals.append(p)
            scores.append([sign * (1.0 - (math.log10(p["lr"]) + 4.0) ** 2 / 16)])
        distances = [abs(math.log10(p["lr"]) + 4.0) for p in proposals[4:]]
        return sum(distances) / len(distances)
    peak, trough = mean_distance(1.0), mean_distance(-1.0)
    assert peak < trough - 0.3, (peak, trough)


def test_several_objectives_have_a_pareto_front_in_their_own_directions():
    """val_acc is maximised, val_ece minimised: a trial worse on both is never best."""
    spec = search(objectives=["val_acc", "val_ece"])
    proposals = [{"lr": 1e-4, "seed": 0}, {"lr": 1e-3, "seed": 0}, {"lr": 1e-5, "seed": 1}]
    scores = [[0.9, 0.05], [0.8, 0.10], [0.7, 0.01]]           # the 2nd is dominated by the 1st
    assert sorted(best_trials(study_of(ENTRY, spec, proposals, scores))) == [0, 2]
    flipped = search(objectives=["val_ece", "val_acc"])
    assert sorted(best_trials(study_of(ENTRY, flipped, proposals,
                                       [list(reversed(s)) for s in scores]))) == [0, 2]


def test_scores_come_from_the_trials_record_in_the_searchs_order():
    record = {"objectives": {"val_acc": 0.9, "val_ece": 0.05, "val_nll": 0.3}}
    assert scores_of(record, search(objectives=["val_ece", "val_acc"])) == [0.05, 0.9]
    assert scores_of({"status": "ok"}, search()) is None and scores_of(None, search()) is None
