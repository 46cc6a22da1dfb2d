"""The `orch` command line: `orch sweep FILE [--dry-run]`, `orch report [SWEEP_ID]`.

User errors (a bad sweep file, a missing folder, an unreachable tracking server)
print one line and exit 2; a sweep that fails while running exits 1. No tracebacks
unless `-v`.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import click

from orchestrator.schema import SpecError


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class RunError(UserError):
    exit_code = 1


def _fail(err: BaseException, verbose: bool, cls=UserError):
    if verbose:
        raise err
    raise cls(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show Ray Tune's tables and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """orch: sweep robust fine-tuning methods for CLIP on Ray, record them in MLflow."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate the file, print the planned trials, exit.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///$PWD/mlflow.db].")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster address [env RAY_ADDRESS; default: a `ray start` cluster on this "
                   "machine, else a local Ray].")
@click.pass_context
def sweep(ctx: click.Context, sweep_file: str, dry_run: bool, tracking_uri: str | None,
          address: str | None) -> None:
    """Fine-tune every grid point of SWEEP_FILE, sweep the mixing coefficient, report."""
    from orchestrator.build import check_benchmark
    from orchestrator.spec import load_spec
    from trainers.data import DataError
    verbose = ctx.obj["verbose"]
    try:
        spec = load_spec(sweep_file)
        check_benchmark(spec.benchmark)
    except SpecError as err:
        raise UserError(f"{sweep_file}: {err}") from None
    except DataError as err:
        raise UserError(f"{sweep_file}: benchmark: {err}") from None
    if dry_run:
        _print_plan(spec, tracking_uri, address)
        return
    _run(spec, tracking_uri, address, verbose)


def _run(spec, tracking_uri, address, verbose) -> None:
    from orchestrator.records import TrackingError, default_tracking_uri
    from orchestrator.report import format_summary
    from orchestrator.sweep import SweepError, mlflow_ui_hint, run_sweep
    from trainers.data import DataError
    from trainers.models import ModelError
    if not verbose:  # after mlflow's import, which sets its own level: its INFO lines are noise
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = tracking_uri or default_tracking_uri()
    try:
        result = run_sweep(spec, uri, address=address, verbose=verbose, echo=click.echo)
    except (TrackingError, DataError, ModelError, SpecError) as err:
        _fail(err, verbose)
    except SweepError as err:
        _fail(err, verbose, RunError)
    click.echo("")
    click.echo(format_summary(result.rows))
    click.echo("")
    click.echo(f"MLflow: sweep {result.sweep_id} (parent run {result.parent_run_id}). To look at it:")
    click.echo("  " + mlflow_ui_hint(uri, result.experiment_id).replace("\n", "\n  "))


def _print_plan(spec, tracking_uri, address) -> None:
    from orchestrator.records import default_tracking_uri
    points = spec.trials()
    r, f = spec.resources, spec.features
    trained = [p for p in points if p.trained]
    click.echo(f"sweep {spec.name}: model {spec.model.arch}"
               + (f" ({spec.model.pretrained})" if spec.model.pretrained else "")
               + f", benchmark {spec.benchmark.source}")
    click.echo(f"{len(points)} trial(s), {len(trained)} of them trained; "
               f"{spec.num_points()} point(s) to evaluate")
    for entry in spec.methods:
        click.echo(f"method {entry.label} ({entry.method}):")
        for point in (p for p in points if p.label == entry.label):
            options = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(point.options).items())
            click.echo(f"  {point.name}: seed={point.seed} {options}")
    for entry in spec.ensembles:
        grid = ", ".join(f"{c} in [{', '.join(f'{v:g}' for v in getattr(entry.options, c))}]"
                         for c in entry.ensemble.coefficients)
        applies = ", ".join(entry.methods) if entry.methods else "every trained method"
        click.echo(f"ensemble {entry.name} ({entry.ensemble.mixes}): {grid}; "
                   f"{len(entry.points())} point(s) per trial; applies to {applies}")
    click.echo(f"resources per trial: {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU; "
               f"max concurrent: {r.max_concurrent_trials or 'as resources allow'}")
    click.echo(f"feature cache: {f.actors or 'auto'} actor(s) x {f.cpus_per_actor:g} CPU, "
               f"{f.gpus_per_actor:g} GPU; batch {f.batch_size}")
    click.echo(f"Ray: {address or 'local (started on demand)'}; storage: {spec.storage_path}")
    click.echo(f"MLflow: {tracking_uri or default_tracking_uri()}, experiment {spec.experiment!r}")


@main.command()
@click.argument("sweep_id", required=False)
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///$PWD/mlflow.db].")
@click.option("--points", is_flag=True, help="List every point, not only the chosen ones.")
@click.pass_context
def report(ctx: click.Context, sweep_id: str | None, tracking_uri: str | None,
           points: bool) -> None:
    """Per method and ensemble, the point chosen on ID validation (last sweep, or SWEEP_ID)."""
    from orchestrator.records import TrackingError, default_tracking_uri
    from orchestrator.report import ReportError, format_points, format_summary, load_sweep
    uri = tracking_uri or default_tracking_uri()
    try:
        found = load_sweep(uri, sweep_id)
    except (TrackingError, ReportError) as err:
        _fail(err, ctx.obj["verbose"])
    click.echo(f"sweep {found.sweep_id} ({found.status}), experiment {found.experiment}")
    click.echo(format_points(found.rows, found.selected) if points else format_summary(found.rows))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
