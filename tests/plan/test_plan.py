"""The plan of a sweep, from its spec alone: every method entry's grid expanded into named
trials in file order, the trial a Tune config stands for, the ensembles of each trial,
the ensemble stage's jobs, and the one order of points."""
from __future__ import annotations

import pytest

from conftest import MULTI_SWEEP, write_sweep
from orchestrator.plan import Job, Plan
from orchestrator.records.row import ALONE
from orchestrator.spec import load_spec


def _multi(**changes):
    data = {k: (list(v) if isinstance(v, list) else v) for k, v in MULTI_SWEEP.items()}
    data.update(changes)
    return data


def test_several_methods_and_ensembles_in_one_file(tmp_path):
    spec = load_spec(write_sweep(tmp_path, MULTI_SWEEP))
    plan = Plan(spec)
    names = [t.name for t in plan.trials]
    assert names == ["zeroshot-00", "ft-00_lr=0.0003_seed=0", "ft-01_lr=0.0001_seed=0",
                     "ft_ls-00", "carot-00_lambda_sd=0.0", "carot-01_lambda_sd=1.5"]
    ft_ls = plan.trials[3]
    assert ft_ls.method_name == "ft" and ft_ls.label == "ft_ls"
    assert ft_ls.options.label_smoothing == 0.1
    carot = plan.trials[4]
    assert carot.options.ema_every == 6 and carot.options.lambda_sd == 0.0
    assert [t.name for t in plan.trained] == names[1:]
    vrf = spec.ensembles[1]
    assert vrf.points() == [{"a": 0.5, "b": 0.2}, {"a": 0.5, "b": 0.6},
                            {"a": 1.0, "b": 0.2}, {"a": 1.0, "b": 0.6}]
    # zero-shot alone; ft/carot: alone + 3 WiSE + 4 VRF; ft_ls: alone + 3 WiSE
    assert plan.num_points() == 1 + 2 * 8 + 4 + 2 * 8
    assert [e.name for e in plan.ensembles_for(ft_ls)] == ["wise_ft"]
    assert plan.ensembles_for(plan.trials[0]) == []
    assert plan.trial("ft_ls-00") is ft_ls


def test_a_trial_is_found_again_from_its_tune_config(tmp_path):
    """Tune's search space holds the named hyper-parameters; each trial rebuilds its
    options (and its name) from them."""
    plan = Plan(load_spec(write_sweep(tmp_path, MULTI_SWEEP)))
    trial = plan.trial_for({"label": "ft", "lr": 1e-4, "seed": 0})
    assert trial.name == "ft-01_lr=0.0001_seed=0" and trial.options.lr == 1e-4
    assert all(plan.trial_for(t.config()) is t for t in plan.trials)
    with pytest.raises(KeyError):
        plan.trial_for({"label": "ft", "lr": 5e-4, "seed": 0})


def test_no_ensembles_at_all_is_allowed(tmp_path):
    spec = load_spec(write_sweep(tmp_path, _multi(ensembles=[])))
    plan = Plan(spec)
    assert spec.ensembles == () and plan.num_points() == len(plan.trials)


def test_trial_names_are_safe_file_names_even_for_a_grid_over_paths(tmp_path):
    """Trial names name journal files and Ray Train folders: a checkpoint path in the
    grid keeps its file name only, and the index keeps the names apart."""
    (tmp_path / "a").mkdir()
    files = [tmp_path / "a" / "ft.pt", tmp_path / "ft.pt"]
    for f in files:
        f.write_bytes(b"")
    spec = load_spec(write_sweep(tmp_path, _multi(methods=[
        {"name": "checkpoint", "path": str(files[0]),
         "grid": {"path": [str(f) for f in files]}}], ensembles=[{"name": "wise_ft"}])))
    names = [t.name for t in Plan(spec).trials]
    assert names == ["checkpoint-00_path=ft.pt", "checkpoint-01_path=ft.pt"]


def test_jobs_are_one_on_cached_outputs_per_trial_and_one_per_interior_weight_point(tmp_path):
    """WiSE-FT's endpoints (alpha 0 and 1) are the members themselves: only alpha 0.5
    needs its own job; VRF is output-space, computed in the cached-outputs job."""
    plan = Plan(load_spec(write_sweep(tmp_path, MULTI_SWEEP)))
    jobs = plan.jobs()
    expected = []
    for trial in plan.trials:
        expected.append(Job(trial.name))
        if trial.trained:
            expected.append(Job(trial.name, "wise_ft", {"alpha": 0.5}))
    assert jobs == expected
    assert all(Job.from_config(job.config()) == job for job in jobs)
    keys = [job.key for job in jobs]
    assert len(set(keys)) == len(keys)
    assert all(key.startswith(job.trial + ".") for key, job in zip(keys, jobs))


def test_positions_list_every_point_once_in_the_sweeps_order(tmp_path):
    """Trials in file order; per trial the model alone, then each ensemble in file order
    over its grid, last coefficient fastest."""
    plan = Plan(load_spec(write_sweep(tmp_path, MULTI_SWEEP)))
    order = []
    for trial in plan.trials:
        order.append(plan.position(trial.name, ALONE, {}))
        for entry in plan.ensembles_for(trial):
            order += [plan.position(trial.name, entry.name, c) for c in entry.points()]
    assert order == list(range(plan.num_points()))
    ft = plan.trials[1].name
    assert plan.position(ft, "vrf", {"a": 0.5, "b": 0.6}) == \
        plan.position(ft, "vrf", {"b": 0.6, "a": 0.5}) == plan.position(ft, ALONE, {}) + 5
