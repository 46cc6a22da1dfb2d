"""How the feature cache lays its Ray Data actors on a cluster: model actors where the
request fits, and image decoders on the CPUs they leave, never more than are left (Ray
Data would wait forever for a CPU no actor gives back)."""
from __future__ import annotations

import pytest

from orchestrator.run.cluster import Have, feature_layout
from orchestrator.spec.types import FeaturesSpec


def layout(have: Have, rows: int = 10**6, **features) -> tuple[int, int]:
    return feature_layout(FeaturesSpec(**features), have, rows)


def test_cpu_model_actors_decode_themselves_by_default():
    assert layout(Have(16, 0)) == (16, 0)
    assert layout(Have(16, 0), cpus_per_actor=4) == (4, 0)


def test_gpu_model_actors_leave_the_other_cpus_to_decoders():
    # one H100 node of 16 cores: one model actor (1 CPU) and 15 decoders
    assert layout(Have(16, 1), gpus_per_actor=1) == (1, 15)
    assert layout(Have(16, 2), gpus_per_actor=1, cpus_per_actor=2) == (2, 12)


def test_asked_decoders_keep_their_cpus_and_never_exceed_what_is_left():
    assert layout(Have(16, 0), decode_actors=6) == (10, 6)
    assert layout(Have(16, 1), gpus_per_actor=1, decode_actors=4) == (1, 4)
    assert layout(Have(2, 0), decode_actors=8) == (1, 1)        # one CPU is all that is left
    assert layout(Have(2, 1), gpus_per_actor=1, cpus_per_actor=2) == (1, 0)


def test_decode_actors_must_not_be_negative():
    with pytest.raises(ValueError, match="decode_actors must be >= 0"):
        FeaturesSpec(decode_actors=-1)
