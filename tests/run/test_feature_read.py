"""Reading the feature cache in bounded memory: a training split's logits are reduced to
top classes chunk by chunk, and agree with the whole logits' argmax."""
from __future__ import annotations

import torch

from orchestrator.run import features


def test_top_classes_come_chunk_by_chunk_and_equal_the_logits_argmax(monkeypatch):
    monkeypatch.setattr(features, "HEAD_CHUNK", 7)           # several chunks, a ragged last
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 10)
    rows = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    logits = features.head_logits(head, rows)
    top = features.head_logits(head, rows, top1=True)
    assert logits.shape == (30, 10) and top.shape == (30,) and top.dtype == torch.int64
    assert torch.equal(top, logits.argmax(1))
    assert features.head_logits(head, rows[:0], top1=True).shape == (0,)
