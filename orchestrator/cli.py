"""The `orch` command line: `orch sweep FILE [KEY=VALUE ...] [--dry-run] [--resume [ID]]`,
`orch report [SWEEP_ID]`, `orch compare A B`, `orch export SWEEP OUT.pt`,
`orch sync SWEEP`, `orch schema`.

User errors (a bad sweep file, a missing folder, an unreachable tracking server, storage
that cannot be written) print one line and exit 2; a sweep that fails while running
exits 1 (also when MLflow stopped taking its records: `orch sync` writes them later);
Ctrl-C stops a sweep cleanly and exits 130. No tracebacks unless `-v`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
import yaml

# Each command imports what it runs when it runs: `orch --help` and `orch report` stay
# quick, without torch, Ray or open_clip.
from orchestrator.spec.schema import SpecError


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class RunError(UserError):
    exit_code = 1


class Interrupted(UserError):
    exit_code = 130


def _fail(err: BaseException | str, verbose: bool, cls=UserError):
    """One line and cls's exit code (-v: the exception itself, with its traceback)."""
    if verbose and isinstance(err, BaseException):
        raise err
    raise cls(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def _quiet_mlflow() -> None:
    """After mlflow's import, which sets its own level: its INFO lines are noise, and a
    store error it logs with a traceback is one line from orch (-v shows both)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _unexpected(err: BaseException, verbose: bool):
    """An error no check foresaw (a storage or MLflow failure surfacing late): still one
    line and exit 1; -v shows the traceback."""
    if verbose:
        raise err
    text = str(err).strip()
    raise RunError(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
                   " (run with -v for the traceback)") from None


BIG_SWEEP = 1000      # training trials above which `orch sweep` asks for --yes


def _verbose(ctx: click.Context, param, value: bool) -> bool:
    """`-v` works before or after the sub-command (`orch -v sweep F`, `orch sweep F -v`)."""
    ctx.ensure_object(dict)
    root = ctx.find_root()
    root.ensure_object(dict)
    root.obj["verbose"] = root.obj.get("verbose", False) or value
    return value


verbose_option = click.option("-v", "--verbose", is_flag=True, expose_value=False,
                              callback=_verbose, is_eager=True,
                              help="Show Ray Tune's tables and full tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbose_option
@click.version_option(package_name="orch", prog_name="orch")
@click.pass_context
def main(ctx: click.Context) -> None:
    """orch: sweep robust fine-tuning methods for CLIP on Ray, record them in MLflow."""
    ctx.ensure_object(dict)
    ctx.obj.setdefault("verbose", False)


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--dry-run", is_flag=True, help="Validate the file, print the planned trials, exit.")
@click.option("--resume", "resume", is_flag=False, flag_value="last", default=None,
              metavar="[SWEEP_ID]",
              help="Continue an interrupted sweep of this file (default: its last unfinished one).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///$PWD/mlflow.db].")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster address [env RAY_ADDRESS; default: a `ray start` cluster on this "
                   "machine, else a local Ray].")
@click.option("--register", default=None, metavar="NAME",
              help="Register the chosen model in MLflow's model registry under NAME.")
@click.option("-y", "--yes", is_flag=True,
              help=f"Run a sweep of more than {BIG_SWEEP} training trials without asking.")
@verbose_option
@click.pass_context
def sweep(ctx: click.Context, sweep_file: str, overrides: tuple[str, ...], dry_run: bool,
          resume: str | None, tracking_uri: str | None, address: str | None,
          register: str | None, yes: bool) -> None:
    """Fine-tune every grid point of SWEEP_FILE, sweep the ensembles' coefficients, report.

    KEY=VALUE pairs after the file change it as if it said so (`method.lr=1e-4`,
    `grid.seed=[0,1,2]`, `methods.1.epochs=3`); the effective file is what is recorded."""
    from orchestrator.assets.benchmarks import check_benchmark, count_notes
    from orchestrator.assets.images import check_images
    from orchestrator.assets.models import download_problem
    from orchestrator.spec.load import load_spec
    from orchestrator.storage import StorageError, check_writable
    from trainers.data import DataError
    verbose = ctx.obj["verbose"]
    try:
        spec = load_spec(sweep_file, overrides)
        offline = download_problem(spec.model)    # weights to download, and no network
        if offline and not dry_run:               # a sweep stops before anything starts
            raise SpecError(*offline)
        if offline:                               # a plan may be made offline
            click.echo(f"note: {': '.join(offline)} (without --dry-run, `orch sweep` "
                       "stops here)", err=True)
        check_writable(spec.storage_path)
        bench = check_benchmark(spec.benchmark)
        for line in count_notes(spec.benchmark, bench):   # before reading any image
            click.echo(line, err=True)
        if bench is not None:
            check_images(bench)
            if not spec.benchmark.shifts:    # refused now, not after hours of training
                raise SpecError("benchmark.shifts", "required: name at least one distribution "
                                "shift (OOD accuracy, every table's second axis, is the mean "
                                "over them)")
    except SpecError as err:
        raise UserError(f"{sweep_file}: {err}") from None
    except StorageError as err:
        raise UserError(f"{sweep_file}: storage_path: {err}") from None
    except DataError as err:
        raise UserError(f"{sweep_file}: benchmark: {err}") from None
    journal = _journal_to_resume(spec, sweep_file, resume, overrides)
    if dry_run:
        if journal is not None:
            click.echo(f"would resume sweep {journal.sweep_id} ({journal.status()}, "
                       f"{len(journal.trials())} trial(s) done)")
        _print_plan(spec, tracking_uri, address, bench)
        return
    from orchestrator.plan import Plan
    plan = Plan(spec)
    trials = len(plan.trained)
    if trials > BIG_SWEEP and not yes:
        raise UserError(f"{sweep_file}: {trials:,} training trials, {plan.num_points():,} "
                        f"points to evaluate; check the grid with --dry-run, and pass --yes "
                        f"to run a sweep this large")
    _run(spec, tracking_uri, address, verbose, journal, register, overrides)


def _journal_to_resume(spec, sweep_file: str, resume: str | None, overrides: tuple[str, ...]):
    """The journal `--resume` names (or the last unfinished sweep of this file); without
    `--resume`, a note when an unfinished sweep of this file exists."""
    from orchestrator.records.journal import FINISHED, find_sweeps, open_journal, unfinished
    from orchestrator.run.driver import resume_command
    source = str(spec.source_file) if spec.source_file else None
    text = spec.text or None
    if resume is None:
        waiting = unfinished(spec.storage_path, spec.name, source, text)
        if waiting:
            last = waiting[-1]
            click.echo(f"note: sweep {last.sweep_id} of this file did not finish "
                       f"({last.status()}, {len(last.trials())} trial(s) done); "
                       f"`{resume_command(spec, last.sweep_id, last.meta().get('overrides', []))}`"
                       " continues it; this starts a new sweep.")
        return None
    if resume == "last":
        waiting = unfinished(spec.storage_path, spec.name, source, text)
        if not waiting:
            raise UserError(f"{sweep_file}: no unfinished sweep of this file in {spec.storage_path}")
        return _same_file(waiting[-1], spec, sweep_file)
    journal = open_journal(spec.storage_path, resume)
    meta = journal.meta()
    if not meta:
        known = ", ".join(j.sweep_id for j, _ in find_sweeps(spec.storage_path, spec.name)) or "none"
        raise UserError(f"{sweep_file}: no sweep {resume!r} in {spec.storage_path} "
                        f"(sweeps of this file: {known})")
    if journal.status() == FINISHED:
        raise UserError(f"{sweep_file}: sweep {resume} already finished (`orch report {resume}`)")
    if meta.get("name") != spec.name:
        raise UserError(f"{sweep_file}: sweep {resume} ran {meta.get('name')!r}, not {spec.name!r}")
    return _same_file(journal, spec, sweep_file)


def _same_file(journal, spec, sweep_file: str):
    """A resumed sweep runs the settings (file and overrides) it started with: finished
    trials of an edited file would be reused under their old settings. Comments and
    layout may change."""
    before = journal.spec_text()
    if before is None or not spec.text:
        return journal
    old, new = _flat(yaml.safe_load(before)), _flat(yaml.safe_load(spec.text))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"{sweep_file}: sweep {journal.sweep_id} ran other settings ({key} "
                        f"was {old.get(key, '(unset)')!r}, is {new.get(key, '(unset)')!r}"
                        f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                        "resume it with the file and overrides it started with, or start a "
                        "new sweep")
    return journal


def _flat(data, prefix: str = "") -> dict:
    """{"method.lr": 1e-4, ...} of a parsed sweep file."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items()
                for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and any(isinstance(x, dict) for x in data):
        return {k: v for i, value in enumerate(data)
                for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def _run(spec, tracking_uri, address, verbose, resume=None, register=None,
         overrides: tuple[str, ...] = ()) -> None:
    from orchestrator.commands.report import format_summary
    from orchestrator.records.mlflow import TrackingError, default_tracking_uri, mlflow_ui_hint
    from orchestrator.run.cluster import ResourceError
    from orchestrator.run.driver import SweepError, SweepInterrupted, run_sweep
    from orchestrator.storage import StorageError
    from trainers.data import DataError
    from trainers.models import ModelError
    if not verbose:
        _quiet_mlflow()
    uri = tracking_uri or (resume.meta().get("tracking_uri") if resume else None) \
        or default_tracking_uri()
    try:
        result = run_sweep(spec, uri, address=address, verbose=verbose, echo=click.echo,
                           resume=resume, register=register, overrides=overrides)
    except SweepInterrupted as err:
        _fail(err, verbose, Interrupted)
    except (TrackingError, DataError, ModelError, SpecError, StorageError) as err:
        _fail(err, verbose)
    except (SweepError, ResourceError) as err:
        _fail(err, verbose, RunError)
    except Exception as err:
        _unexpected(err, verbose)
    click.echo("")
    click.echo(format_summary(result.table))
    click.echo("")
    if result.mlflow_failed:
        raise RunError(f"MLflow stopped taking this sweep's records ({result.mlflow_failed}); "
                       f"the results are kept: `orch sync {result.journal}` writes them")
    click.echo(f"MLflow: sweep {result.sweep_id} (parent run {result.parent_run_id}). To look at it:")
    click.echo("  " + mlflow_ui_hint(uri, result.experiment_id).replace("\n", "\n  "))


def _print_plan(spec, tracking_uri, address, bench=None) -> None:
    from orchestrator.plan import Plan
    from orchestrator.records.mlflow import default_tracking_uri
    plan = Plan(spec)
    points = plan.trials
    trained = len(plan.trained)
    if trained > BIG_SWEEP:
        click.echo(f"a large sweep: {trained:,} training trials; `orch sweep` asks for --yes")
    r, f = spec.resources, spec.features
    trained = [p for p in points if p.trained]
    click.echo(f"sweep {spec.name}: model {spec.model.arch}"
               + (f" ({spec.model.pretrained})" if spec.model.pretrained else "")
               + f", benchmark {'suite ' if spec.benchmark.suite else ''}"
                 f"{spec.benchmark.source}")
    click.echo(f"{len(points)} trial(s), {len(trained)} of them trained; "
               f"{plan.num_points()} point(s) to evaluate")
    for entry in spec.methods:
        click.echo(f"method {entry.label} ({entry.method_name}):")
        if entry.searched:
            space = ", ".join(f"{k}: {v.describe() if hasattr(v, 'describe') else v}"
                              for k, v in entry.grid.items())
            click.echo(f"  {spec.search.n_trials} trial(s) proposed by {spec.search.searcher} "
                       f"over {space}")
        for point in (p for p in points if p.label == entry.label):
            options = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(point.options).items())
            click.echo(f"  {point.name}: seed={point.seed} {options}")
    for entry in spec.ensembles:
        grid = ", ".join(f"{c} in [{', '.join(f'{v:g}' for v in getattr(entry.options, c))}]"
                         for c in entry.ensemble.coefficients)
        applies = ", ".join(entry.methods) if entry.methods else "every trained method"
        click.echo(f"ensemble {entry.name} ({entry.ensemble.mixes}): {grid}; "
                   f"{len(entry.points())} point(s) per trial; applies to {applies}")
    if spec.search.searcher:
        s = spec.search
        click.echo(f"search: {s.searcher} (TPE, seed {s.seed}) on ID validation "
                   f"{', '.join(s.objectives)}; {s.n_trials} trial(s) per searched entry, in "
                   f"rounds of as many as run at once")
    if spec.search.scheduler:
        s = spec.search
        click.echo(f"early stopping: {s.scheduler} on ID validation accuracy per epoch, grace "
                   f"{s.grace_period} epoch(s), reduction factor {s.reduction_factor:g}; "
                   f"searches {', '.join(s.methods) if s.methods else 'every trained method'}")
    click.echo(f"resources per trial: {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU; "
               f"max concurrent: {r.max_concurrent_trials or 'as resources allow'}")
    click.echo(f"feature cache: {f.actors or 'auto'} actor(s) x {f.cpus_per_actor:g} CPU, "
               f"{f.gpus_per_actor:g} GPU; decoders: "
               f"{'auto' if f.decode_actors is None else f.decode_actors}; batch {f.batch_size}")
    click.echo(f"Ray: {address or 'local (started on demand)'}; storage: {spec.storage_path}")
    click.echo(f"MLflow: {tracking_uri or default_tracking_uri()}, experiment {spec.experiment!r}")
    click.echo("sets (classes, images):")
    for name, classes, images, role in _set_sizes(spec, bench):
        click.echo(f"  {name}: {classes} classes, {images:,} images ({role})")


def _set_sizes(spec, bench) -> list[tuple[str, int, int, str]]:
    """(name, classes, images, role) of the training split and every eval set; for the toy
    world from its definition (nothing is rendered for a dry run)."""
    if bench is None:   # the toy world
        from trainers.toyworld import world
        cfg = world.WorldConfig()
        n = len(world.CLASSNAMES)
        train = min(world.split_size(cfg, "id_train"), spec.benchmark.train_size or 10**12)
        sets = [(split, len(world.OBJECTNET_CLASSES) if split == "objectnet" else n,
                 min(world.split_size(cfg, split), spec.benchmark.eval_size or 10**12),
                 split not in world.SHIFT_SPLITS)
                for split in world.EVAL_SPLITS if split != "id_train"]
    else:
        n, train = bench.num_classes, len(bench.train)
        sets = [(name, s.num_classes, len(s.dataset), name in bench.diagnostics,
                 any(len(g) > 1 for g in s.class_groups))
                for name, s in bench.eval_sets().items()]
    sizes = [("train", n, train, "ID training")]
    for name, classes, images, diagnostic, *mapped in sets:
        role = ("ID validation" if name == "id_val" else "ID test" if name == "id_test"
                else "diagnostic" if diagnostic else "shift")
        if mapped and mapped[0]:
            role += f", its {classes} classes mapped onto the {n} (max logit)"
        elif classes != n:
            role += f", {classes} of {n} classes"
        sizes.append((name, classes, images, role))
    return sizes


@main.command()
@click.argument("sweep_id", required=False)
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///$PWD/mlflow.db].")
@click.option("--points", is_flag=True, help="List every point, not only the chosen ones.")
@click.option("--json", "as_json", is_flag=True, help="Every point and the choices, as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Every point, as CSV.")
@verbose_option
@click.pass_context
def report(ctx: click.Context, sweep_id: str | None, tracking_uri: str | None,
           points: bool, as_json: bool, as_csv: bool) -> None:
    """Per method and ensemble, the point chosen on ID validation (last sweep, or SWEEP_ID)."""
    from orchestrator.commands.compare import to_csv, to_json
    from orchestrator.commands.report import ReportError, format_points, format_summary, load_sweep
    from orchestrator.records.mlflow import TrackingError, default_tracking_uri
    if as_json and as_csv:
        raise UserError("--json and --csv: choose one")
    uri = tracking_uri or default_tracking_uri()
    try:
        found = load_sweep(uri, sweep_id)
    except (TrackingError, ReportError) as err:
        _fail(err, ctx.obj["verbose"])
    except Exception as err:
        _unexpected(err, ctx.obj["verbose"])
    if as_json:
        click.echo(to_json(found))
        return
    if as_csv:
        click.echo(to_csv(found.table), nl=False)
        return
    click.echo(f"sweep {found.sweep_id} ({found.status}), experiment {found.experiment}")
    if found.note:
        click.echo(found.note)
    click.echo(format_points(found.table) if points else format_summary(found.table))
    if found.stopped:
        click.echo("stopped early by the search (no model; not in the table):")
        for line in found.stopped:
            click.echo(f"  {line}")
    for line in found.notes:
        click.echo(f"note: {line}")


@main.command()
@click.argument("sweep_a")
@click.argument("sweep_b")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///$PWD/mlflow.db].")
@click.option("--out", "out", type=click.Path(dir_okay=False), default="compare.png",
              show_default=True, help="Where to write the plot of both Pareto fronts.")
@verbose_option
@click.pass_context
def compare(ctx: click.Context, sweep_a: str, sweep_b: str, tracking_uri: str | None,
            out: str) -> None:
    """Two sweeps' Pareto fronts on one plot, and their chosen points side by side."""
    from orchestrator.commands.compare import compare_sweeps
    from orchestrator.commands.report import ReportError, load_sweep
    from orchestrator.records.mlflow import TrackingError, default_tracking_uri
    uri = tracking_uri or default_tracking_uri()
    try:
        found = [load_sweep(uri, sweep_a), load_sweep(uri, sweep_b)]
        click.echo(compare_sweeps(found, out))
    except (TrackingError, ReportError) as err:
        _fail(err, ctx.obj["verbose"])
    except OSError as err:
        _fail(f"--out {out}: {err.strerror or err}", ctx.obj["verbose"])
    except Exception as err:
        _unexpected(err, ctx.obj["verbose"])


@main.command()
@click.argument("sweep")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--trial", default=None, help="The trained trial (default: the sweep's chosen point).")
@click.option("--alpha", type=float, default=None, help="WiSE-FT's mixing coefficient.")
@click.option("--coeffs", default=None, metavar="K=V,...",
              help="A weight-space ensemble's coefficients, e.g. alpha=0.4.")
@click.option("--storage-path", default=None,
              help="Where the sweep ran (its file's storage_path), when SWEEP is an id "
                   "[default: where its MLflow records say, else ./runs].")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI, to find SWEEP's folder from its id.")
@verbose_option
@click.pass_context
def export(ctx: click.Context, sweep: str, out: str, trial: str | None, alpha: float | None,
           coeffs: str | None, storage_path: str | None, tracking_uri: str | None) -> None:
    """Write one point of SWEEP as a plain open_clip checkpoint OUT (with its head, class
    names and templates), loadable without orch."""
    from orchestrator.commands.export import ExportError, export_sweep
    if alpha is not None and coeffs:
        raise UserError("--alpha and --coeffs: give one")
    coefficients = {"alpha": alpha} if alpha is not None else None
    if coeffs:
        try:
            coefficients = {k.strip(): float(v) for k, v in
                            (part.split("=", 1) for part in coeffs.split(","))}
        except ValueError:
            raise UserError(f"--coeffs: expected name=value pairs, got {coeffs!r}") from None
    try:
        click.echo(export_sweep(sweep, storage_path, Path(out), trial, coefficients,
                                tracking_uri))
    except ExportError as err:
        _fail(err, ctx.obj["verbose"])
    except OSError as err:
        _fail(f"{out}: {err.strerror or err}", ctx.obj["verbose"], RunError)
    except Exception as err:
        _unexpected(err, ctx.obj["verbose"])


@main.command()
def schema() -> None:
    """Print the sweep file's JSON Schema (for editors: `orch schema > sweep.schema.json`)."""
    from orchestrator.spec.jsonschema import sweep_schema
    click.echo(json.dumps(sweep_schema(), indent=2))


@main.command()
@click.argument("sweep")
@click.option("--storage-path", default=None,
              help="Where the sweep ran (its file's storage_path), when SWEEP is an id "
                   "[default: where its MLflow records say, else ./runs].")
# Not read from $MLFLOW_TRACKING_URI: a sweep's records belong in the store it used (its
# journal says which); the variable only finds a sweep given by id, or stands in for a
# journal that names no store.
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: the one the sweep used, else "
                   "$MLFLOW_TRACKING_URI].")
@click.option("--force", is_flag=True,
              help="Sync a sweep recorded as running on another machine that is gone.")
@verbose_option
@click.pass_context
def sync(ctx: click.Context, sweep: str, storage_path: str | None, tracking_uri: str | None,
         force: bool) -> None:
    """Write to MLflow whatever SWEEP (an id, or the sweep's folder) recorded and MLflow lacks."""
    from orchestrator.commands.sweeps import SweepNotFound
    from orchestrator.commands.sync import SyncError, sync_sweep
    from orchestrator.records.mlflow import TrackingError
    verbose = ctx.obj["verbose"]
    if not verbose:
        _quiet_mlflow()
    try:
        summary = sync_sweep(sweep, storage_path, tracking_uri, echo=click.echo, force=force)
    except (SyncError, SweepNotFound, TrackingError) as err:
        _fail(err, verbose)
    except Exception as err:
        _unexpected(err, verbose)
    click.echo(summary)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
