"""The Tune callback that records each trial as it ends (journal first, then MLflow),
notes each trial's latest checkpoint (a resumed sweep continues from it), and counts
finished trials on the stage's progress line.

Tune pickles callbacks into its experiment state and a resumed sweep gets back the
pickled ones, so the callback holds only the sweep id and the stage: the journal, the
MLflow writer and the progress line of the process running the sweep now are looked up
in `LIVE` when a trial ends.
"""
from __future__ import annotations

from typing import Any, Protocol

from ray import tune


class LiveSweep(Protocol):
    interrupted: bool

    def trial_started(self, stage: str, trial: Any) -> None: ...

    def trial_finished(self, stage: str, trial: Any, error: str | None) -> None: ...

    def trial_restarted(self, stage: str, trial: Any) -> None: ...

    def trial_checkpointed(self, stage: str, trial: Any, path: str) -> None: ...


LIVE: dict[str, LiveSweep] = {}


class RecordCallback(tune.Callback):
    def __init__(self, sweep_id: str, stage: str):
        self.sweep_id, self.stage = sweep_id, stage

    def __getstate__(self) -> dict:
        return {"sweep_id": self.sweep_id, "stage": self.stage}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _live(self) -> LiveSweep | None:
        return LIVE.get(self.sweep_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            live.trial_started(self.stage, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            live.trial_finished(self.stage, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            error = trial.get_error()
            live.trial_finished(self.stage, trial, _last_line(str(error)) if error else "error")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # a data-parallel trial's epoch checkpoints live in Ray Train's storage; their
        # path comes with the metrics
        live = self._live()
        if live is not None and isinstance(result.get("checkpoint_path"), str):
            live.trial_checkpointed(self.stage, trial, result["checkpoint_path"])

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        live = self._live()
        if live is not None:
            live.trial_checkpointed(self.stage, trial, checkpoint.path)

    def on_trial_recover(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            live.trial_restarted(self.stage, trial)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


class InterruptStopper(tune.Stopper):
    """Stops every trial of the experiment once the sweep was interrupted (Ctrl-C or
    SIGTERM): Tune then ends the experiment cleanly and saves its state for `--resume`."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        live = LIVE.get(self.sweep_id)
        return bool(live is not None and live.interrupted)
