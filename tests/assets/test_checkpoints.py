"""A trial checkpoint that is not plain tensors is refused by `load_fitted` without running
any of its code; one that is plain tensors loads (the refusal is the safe loader, not a
broken one)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.assets.loaded import load_fitted, save_fitted
from trainers.methods import Fitted


def _make_marker(path: str):
    Path(path).write_text("code from a checkpoint ran")


class _Payload:
    """Unpickling it calls os.mkdir(marker): code run by loading a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Opaque:
    """A custom class that is not a tensor; unpickling it would run its __setstate__."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        _make_marker(state["marker"])


def _assets():
    """What load_fitted reads from its Assets: the zero-shot classifier to copy."""
    return SimpleNamespace(start=SimpleNamespace(zero_shot=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("make", [_Payload, _Opaque], ids=["reduce-payload", "custom-class"])
def test_load_fitted_refuses_a_checkpoint_that_is_not_tensors(tmp_path, make):
    marker = tmp_path / "marker"
    path = tmp_path / "trial.pt"
    torch.save({"classifier": {"weight": make(marker), "bias": torch.zeros(2)},
                "text_tower": None}, path)
    if make is _Payload:
        # the file really carries code: a plain torch.load runs it
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.rmdir()
    with pytest.raises(Exception) as refused:   # pickle.UnpicklingError in torch 2.14
        load_fitted(_assets(), path, torch.device("cpu"))
    assert isinstance(refused.value, (pickle.UnpicklingError, RuntimeError)), refused.value
    assert "weights only" in str(refused.value).lower()
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_load_fitted_reads_a_plain_tensor_checkpoint(tmp_path):
    """The refusal above is the safe loader, not a broken one: tensors load."""
    trained = torch.nn.Linear(2, 2)
    save_fitted(Fitted(trained), tmp_path / "trial.pt")
    fitted = load_fitted(_assets(), tmp_path / "trial.pt", torch.device("cpu"))
    assert torch.equal(fitted.classifier.weight, trained.weight)
    assert fitted.text_tower is None
