"""Named benchmark suites: a standard task and its published shifts from one short block of
a sweep file (``suite: imagenet``, ``suite: domainnet``), with the class list, label order,
class subsets and many-to-one maps of the evaluation protocol built in.

A suite is one file in this package that defines ``SUITE = Suite(...)``; ``SUITES`` maps
each name to it. A suite's ``load`` returns a :class:`~trainers.data.Benchmark` whose shift
sets carry their own class spaces (``EvalSet.class_groups``), so logits are restricted or
max-pooled BEFORE any softmax, exactly as for hand-written benchmarks.
"""
from __future__ import annotations

from . import domainnet, imagenet
from .common import TRAIN, Suite, SuiteOptions, count_mismatches, hold_out_validation

__all__ = ["SuiteOptions", "Suite", "SUITES", "get_suite", "count_mismatches",
           "hold_out_validation", "TRAIN"]

SUITES: dict[str, Suite] = {s.name: s for s in (imagenet.SUITE, domainnet.SUITE)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise DataError(f"unknown benchmark suite {name!r} (known: {', '.join(sorted(SUITES))})")
    return SUITES[name]
