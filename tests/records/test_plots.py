"""The plots people read: a colour per trial named in the legend, and the effective-
robustness view (logit axes, the zero-shot point, the sweep file's baseline), written by
the report stage beside the Pareto plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from orchestrator.plan import Plan
from orchestrator.records.plots import (expit, logit, plot_calibration, plot_pareto,
                                        plot_robustness, trial_label, zero_shot_point)
from orchestrator.records.publish import publish
from orchestrator.records.row import ALONE, Row
from orchestrator.records.table import Table
from orchestrator.spec.jsonschema import sweep_schema
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.schema import SpecError
from orchestrator.spec.types import RobustnessLine

SPEC = {
    "name": "plots",
    "benchmark": {"source": "toyworld"},
    "model": {"arch": "toy"},
    "methods": [{"name": "zeroshot"},
                {"name": "ft", "grid": {"lr": [3.0e-4, 1.0e-4], "seed": [0]}}],
    "ensembles": [{"name": "wise_ft", "alpha": [0.0, 0.5, 1.0]}],
    "report": {"robustness_line": {"slope": 0.8, "intercept": -0.3}},
}
ALPHAS = (0.0, 0.5, 1.0)
# reliability bins (count, summed confidence, summed correct) of ID test and OOD
BINS = {part: [[0.0] * 14 + [10.0], [0.0] * 14 + [9.5], [0.0] * 14 + [8.0]]
        for part in ("id", "ood")}


def metrics(id_acc: float, ood_acc: float) -> dict[str, float]:
    return {"id_acc": id_acc, "ood_acc": ood_acc, "val_acc": id_acc, "val_nll": 1 - id_acc,
            "id_ece": 0.05, "ood_ece": 0.1}


def plan_rows(plan: Plan) -> list[Row]:
    """The zero-shot model alone, and each FT trial alone and with WiSE-FT, as the ensemble
    stage makes them (names and positions from the plan): the two learning rates differ."""
    rows = []
    for trial in plan.trials:
        if not trial.trained:
            rows.append(Row(trial.name, trial.label, ALONE, {},
                            plan.position(trial.name, ALONE, {}), metrics(0.6, 0.5), BINS))
            continue
        gain = 1.0 if trial.options.lr > 2e-4 else 0.5
        rows.append(Row(trial.name, trial.label, ALONE, {}, plan.position(trial.name, ALONE, {}),
                        metrics(0.6 + 0.3 * gain, 0.45), BINS))
        for alpha in ALPHAS:
            c = {"alpha": alpha}
            rows.append(Row(trial.name, trial.label, "wise_ft", c,
                            plan.position(trial.name, "wise_ft", c),
                            metrics(0.6 + 0.3 * gain * alpha,
                                    0.5 + 0.1 * alpha * (1 - alpha) - 0.05 * alpha), BINS))
    return rows


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan(parse_spec(SPEC))


@pytest.fixture(scope="module")
def table(plan) -> Table:
    return Table.of(plan_rows(plan))


def legend_trials(fig) -> dict[str, tuple]:
    """The legend's trial entries (colour patches): label -> colour."""
    legend = fig.axes[0].get_legend()
    return {text.get_text(): to_rgba(handle.get_facecolor())
            for handle, text in zip(legend.legend_handles, legend.get_texts())
            if isinstance(handle, Patch)}


def test_trials_are_named_by_method_and_grid_values(plan):
    names = [t.name for t in plan.trials]
    assert names == ["zeroshot-00", "ft-00_lr=0.0003_seed=0", "ft-01_lr=0.0001_seed=0"]
    labels = [trial_label(Row(t.name, t.label, ALONE, {}, 0, {})) for t in plan.trials]
    assert labels == ["zeroshot", "ft lr=0.0003, seed=0", "ft lr=0.0001, seed=0"]
    # a key with '_' in it stays whole; a name of another shape is shown as it is
    assert trial_label(Row("ft-02_weight_decay=0.1_lr=1e-05", "ft", ALONE, {}, 0, {})) \
        == "ft weight_decay=0.1, lr=1e-05"
    assert trial_label(Row("imported", "ft", ALONE, {}, 0, {})) == "imported"


@pytest.mark.parametrize("draw", [plot_pareto, plot_calibration,
                                  lambda t, title: plot_robustness(t, title)])
def test_two_trials_of_one_method_get_two_colours_each_named_once(table, draw):
    fig = draw(table, "test")
    entries = legend_trials(fig)
    assert list(entries) == ["zeroshot", "ft lr=0.0003, seed=0", "ft lr=0.0001, seed=0"]
    assert len(set(entries.values())) == 3                    # one colour each
    # the ensemble's curve of each trial is drawn in that trial's colour (Pareto plots)
    curves = {line.get_gid(): to_rgba(line.get_color()) for line in fig.axes[0].get_lines()
              if line.get_gid() and "/" in line.get_gid()}
    if draw is not plot_calibration:
        assert curves == {"ft-00_lr=0.0003_seed=0/wise_ft": entries["ft lr=0.0003, seed=0"],
                          "ft-01_lr=0.0001_seed=0/wise_ft": entries["ft lr=0.0001, seed=0"]}
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"wise_ft", "model alone (no ensemble)", "chosen on ID validation"} <= set(texts)


def test_the_logit_axis_maps_accuracy_to_its_log_odds_and_back(table):
    p = np.array([0.1, 0.5, 0.75, 0.9, 0.99])
    assert logit(p) == pytest.approx(np.log(p / (1 - p)))
    assert logit(0.9) == pytest.approx(math.log(9))
    assert expit(logit(p)) == pytest.approx(p)
    assert np.isfinite(logit([0.0, 1.0])).all()       # a perfect set stays on the axes
    ax = plot_robustness(table, "test").axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        transform = axis.get_transform()
        assert transform.transform(p) == pytest.approx(np.log(p / (1 - p)))
        assert transform.inverted().transform(np.log(p / (1 - p))) == pytest.approx(p)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels and all(label.endswith("%") for label in labels), labels


def test_the_baseline_is_drawn_where_the_sweep_file_puts_it(plan, table):
    line = plan.spec.report.robustness_line
    assert line == RobustnessLine(slope=0.8, intercept=-0.3)
    ax = plot_robustness(table, "test", line=line).axes[0]
    (baseline,) = [ln for ln in ax.get_lines() if ln.get_gid() == "robustness_line"]
    xs, ys = np.asarray(baseline.get_xdata()), np.asarray(baseline.get_ydata())
    assert logit(ys) == pytest.approx(0.8 * logit(xs) - 0.3)
    assert (xs.min(), xs.max()) == pytest.approx(ax.get_xlim())   # across the whole plot
    assert "0.8 logit(ID) - 0.3" in baseline.get_label()
    # no line in the sweep file, no line on the plot
    bare = plot_robustness(table, "test").axes[0]
    assert not [ln for ln in bare.get_lines() if ln.get_gid() == "robustness_line"]


def test_the_zero_shot_point_is_marked(plan, table):
    untrained = [t.name for t in plan.trials if not t.trained]
    zero_shot = zero_shot_point(table, untrained)
    assert (zero_shot.trial, zero_shot.ensemble) == ("zeroshot-00", ALONE)
    ax = plot_robustness(table, "test", zero_shot).axes[0]
    (marker,) = [c for c in ax.collections if c.get_gid() == "zero_shot"]
    assert marker.get_offsets().tolist() == [[0.6, 0.5]]
    assert "zero-shot model" in [t.get_text() for t in ax.get_legend().get_texts()]
    # without a zero-shot entry, WiSE-FT's alpha 0 is the zero-shot model exactly
    no_entry = Table.of([r for r in table.rows if r.trial != "zeroshot-00"])
    found = zero_shot_point(no_entry)
    assert (found.ensemble, found.coefficients) == ("wise_ft", {"alpha": 0.0})
    assert zero_shot_point(Table.of([r for r in no_entry.rows if r.ensemble == ALONE])) is None


def test_the_report_spec_is_strict_and_in_the_editor_schema():
    assert parse_spec({**SPEC, "report": {}}).report.robustness_line is None
    assert parse_spec({k: v for k, v in SPEC.items() if k != "report"}).report.robustness_line \
        is None
    for report, where in (({"robustness": {}}, "report.robustness"),
                          ({"robustness_line": {"slope": 1}}, "report.robustness_line.intercept"),
                          ({"robustness_line": {"slope": "steep", "intercept": 0}},
                           "report.robustness_line.slope")):
        with pytest.raises(SpecError) as err:
            parse_spec({**SPEC, "report": report})
        assert err.value.path == where
    jsonschema = pytest.importorskip("jsonschema")
    schema = sweep_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not list(validator.iter_errors(SPEC))
    assert list(validator.iter_errors({**SPEC, "report": {"robustness": {}}}))


class FakeRecords:
    """What `publish` writes to MLflow, kept; an MLflow that is down (`failed`), so no
    model is logged. Figures are saved as they come: publish closes them after."""

    sweep_id, parent_id, failed = "s", "parent", "down"

    def __init__(self, folder):
        self.folder, self.figures = folder, {}

    def existing(self):
        return {}

    def metrics(self, run_id, values):
        pass

    def has_model(self):
        return False

    def summary(self, table, run_ids, choices, figures, metrics, tags):
        self.figures = dict(figures)
        for path, figure in figures.items():
            (self.folder / path).parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(self.folder / path)


def test_the_report_logs_the_robustness_plot_beside_the_pareto_plot(plan, table, tmp_path):
    records = FakeRecords(tmp_path)
    publish(records, plan, table, models={})
    assert {"pareto.png", "robustness.png", "calibration.png"} <= set(records.figures)
    ax = records.figures["robustness.png"].axes[0]
    assert [ln.get_gid() for ln in ax.get_lines()].count("robustness_line") == 1
    assert [c.get_gid() for c in ax.collections].count("zero_shot") == 1
    for name in ("pareto.png", "robustness.png"):
        assert (tmp_path / name).stat().st_size > 10_000
