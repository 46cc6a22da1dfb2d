"""The functions Ray Tune runs: one training trial per grid point, one evaluation
trial per (training trial, mixing coefficient).

Only `ray.tune.*` is used inside trials (Ray 2.60: `ray.train.*` there fails the
trial). Everything a trial reads comes from absolute paths resolved on the driver.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from ray import tune

from orchestrator.build import load_benchmark, load_model, zero_shot
from orchestrator.spec import SweepSpec
from trainers.cache import fingerprint
from trainers.evaluate import evaluate, summarize
from trainers.methods import FitContext, get_method
from trainers.methods.wise_ft import wise_ft
from trainers.train_loop import Hooks

STATE_FILE = "train_state.pt"        # per-epoch resumable state (model, optimizer, ...)
CLASSIFIER_FILE = "classifier.pt"    # final fine-tuned classifier weights


# Trials run in reused Ray actors (TuneConfig(reuse_actors=True)): keep the last loaded
# model, benchmark and zero-shot classifier of this process, so the 11 alphas of a sweep
# load them once per worker instead of once per trial.
_LOADED: dict[str, tuple] = {}


def _load(spec: SweepSpec, device: torch.device):
    """(benchmark, zero-shot classifier) for this spec, cached per process."""
    key = fingerprint([dataclasses.asdict(spec.model), dataclasses.asdict(spec.benchmark),
                       str(device)])
    if key not in _LOADED:
        _LOADED.clear()
        clip = load_model(spec.model, device=device)
        bench = load_benchmark(spec.benchmark, clip)
        _LOADED[key] = (bench, zero_shot(clip, bench, device))
    return _LOADED[key]


def _setup(spec: SweepSpec) -> torch.device:
    # Tune gives a trial `cpus_per_trial` cores; more threads than that oversubscribe them.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def train_trial(config: dict, spec: SweepSpec) -> None:
    """Fine-tune one grid point; checkpoint every epoch; end with the classifier weights."""
    device = _setup(spec)
    point = spec.trials()[config["trial"]]
    method = get_method(point.method)
    bench, zero_shot_model = _load(spec, device)
    model = copy.deepcopy(zero_shot_model)   # the cached one must stay zero-shot

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restarted trial continues from its last epoch
        with checkpoint.as_directory() as folder:
            if (Path(folder) / STATE_FILE).is_file():
                resume_state = torch.load(Path(folder) / STATE_FILE, map_location=device,
                                          weights_only=False)

    history: list[dict] = list(resume_state["history"]) if resume_state else []

    def on_epoch_end(epoch: int, metrics: dict, state: dict) -> None:
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    hooks = Hooks(on_epoch_end=on_epoch_end, resume_state=resume_state, progress=False,
                  num_workers=spec.eval.num_workers)
    fitted = method.fit(model, point.options, FitContext(bench.train, device, point.seed, hooks))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(fitted.state_dict(), Path(folder) / CLASSIFIER_FILE)
        # The whole loss curve rides on the last report, so the driver can log it to
        # MLflow from the final result alone.
        tune.report({"done": True, "history": json.dumps(history)},
                    checkpoint=tune.Checkpoint.from_directory(folder))


def eval_trial(config: dict, spec: SweepSpec, checkpoints: dict[int, str]) -> None:
    """Evaluate WiSE-FT at one alpha for one trained trial on every eval set."""
    device = _setup(spec)
    point = spec.trials()[config["trial"]]
    bench, zero_shot_model = _load(spec, device)
    fine_tuned = copy.deepcopy(zero_shot_model)
    fine_tuned.load_state_dict(torch.load(Path(checkpoints[point.index]) / CLASSIFIER_FILE,
                                          map_location=device))
    model = wise_ft(zero_shot_model, fine_tuned, config["alpha"])
    per_set = evaluate(model, bench.eval_sets(), device, batch_size=spec.eval.batch_size,
                       num_workers=spec.eval.num_workers)
    tune.report(summarize(per_set, bench.shift_names))
