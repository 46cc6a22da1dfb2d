"""Ray for a sweep: starting it (or joining a cluster), keeping it closed, and every piece
of resource arithmetic in one place (what a trial, a data-parallel worker and a feature
actor ask for; how many run at once; what the cluster cannot give, refused before Ray
would wait for it forever)."""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import ray

from orchestrator.spec.types import FeaturesSpec, ResourcesSpec


class ResourceError(RuntimeError):
    """A request the Ray cluster cannot satisfy (Ray would hang instead of failing)."""


def init_ray(address: str | None, verbose: bool) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not verbose:
        # Quiet unless -v: Tune's experiment banners, its snapshot-frequency warning
        # (num_to_keep forces a snapshot per checkpoint, which is what we want) and its
        # tracebacks of failed trials (orch reports one line and the trial's log folder).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        # "Token authentication is enabled for this Ray cluster": as it should be
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        # Ray Data's per-dataset lines, its warning that an actor pool holding every CPU
        # may starve other stages (orch's reads and writes take no CPU) and its stack
        # traces of a failed job (orch reports the cause in one line)
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        # A failed trial's error also sits in an object Ray never fetches; at exit Ray
        # prints its whole traceback again. orch has reported it, in one line.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        # Ray's processes listen on every interface; its token authentication (on by
        # default since 2.52) is what keeps others out, so orch leaves it on, and makes
        # the token itself readable by this user only (Ray would write it world-readable).
        private_token()
        ray.init(include_dashboard=False, log_to_driver=verbose,
                 logging_level="INFO" if verbose else "WARNING")


def private_token() -> None:
    """Create Ray's token file (~/.ray/auth_token, Ray's own format: 64 hex digits) with
    mode 0600 before Ray does, or tighten an existing one."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # written whole under a private name, then linked into place: a second orch
        # starting at the same moment finds either no file or a complete one
        tmp = path.with_name(f".auth_token.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                          # the other one was first: its token it is
        finally:
            tmp.unlink(missing_ok=True)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)


@dataclass(frozen=True)
class Have:
    """What the cluster has."""

    cpus: float
    gpus: float

    @classmethod
    def now(cls) -> "Have":
        have = ray.cluster_resources()
        return cls(have.get("CPU", 0.0), have.get("GPU", 0.0))

    def fits(self, cpus: float, gpus: float) -> int:
        """How many of a request of (cpus, gpus) fit at once (at least 1)."""
        by_cpu = int(self.cpus // cpus) if cpus else 10**9
        by_gpu = int(self.gpus // gpus) if gpus else 10**9
        return max(1, min(by_cpu, by_gpu))


def trial_request(r: ResourcesSpec, data_parallel: bool) -> dict[str, float]:
    """What one Tune trial asks for. A data-parallel trial only drives its Ray Train
    workers, which ask for the resources themselves: the trial takes a sliver of a CPU."""
    if data_parallel:
        return {"cpu": 0.01}
    return {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}


def worker_request(r: ResourcesSpec) -> dict[str, float]:
    """What one data-parallel worker (Ray Train) asks for."""
    return {"CPU": r.cpus_per_trial, **({"GPU": r.gpus_per_trial} if r.gpus_per_trial else {})}


def concurrent_trials(r: ResourcesSpec, data_parallel: bool, have: Have) -> int | None:
    """How many trials run at once. Data-parallel trials: as many as have all their
    workers' resources (more would start drivers that wait for workers forever)."""
    if not data_parallel:
        return r.max_concurrent_trials
    n = r.workers_per_trial
    fits = have.fits(r.cpus_per_trial * n, r.gpus_per_trial * n)
    return min(fits, r.max_concurrent_trials or fits)


def feature_actors(f: FeaturesSpec, have: Have, rows: int) -> int:
    """The feature cache's actor pool: `features.actors`, else as many as the cluster fits,
    but no more than the job has work for (a small job is not worth loading a model in
    many actors)."""
    if f.actors:
        return f.actors
    return max(1, min(have.fits(f.cpus_per_actor, f.gpus_per_actor), rows // (4 * f.batch_size)))


def decode_actors(f: FeaturesSpec, have: Have, model_actors: int) -> int:
    """CPU actors decoding images for the model actors: `features.decode_actors`, else
    none for CPU model actors and every CPU the model actors leave for GPU ones. Never
    more than the CPUs left: Ray Data would wait for a CPU no actor gives back."""
    left = int(have.cpus - model_actors * f.cpus_per_actor)
    wanted = f.decode_actors if f.decode_actors is not None else \
        (left if f.gpus_per_actor > 0 else 0)
    return max(0, min(wanted, left))


def feature_layout(f: FeaturesSpec, have: Have, rows: int) -> tuple[int, int]:
    """(model actors, decoder actors) of one encoding job: decoders asked for keep their
    CPUs, and the model actors fit in the rest."""
    rest = Have(max(have.cpus - (f.decode_actors or 0), f.cpus_per_actor), have.gpus)
    actors = feature_actors(f, rest, rows)
    return actors, decode_actors(f, have, actors)


def check_resources(r: ResourcesSpec, f: FeaturesSpec, have: Have) -> None:
    """Unsatisfiable requests hang in Ray instead of failing: refuse them here."""
    actors = f.actors or 1
    n = r.workers_per_trial
    checks = [("resources.cpus_per_trial", r.cpus_per_trial * n, have.cpus, "CPUs"),
              ("resources.gpus_per_trial", r.gpus_per_trial * n, have.gpus, "GPUs"),
              ("features.cpus_per_actor", f.cpus_per_actor * actors, have.cpus, "CPUs"),
              ("features.gpus_per_actor", f.gpus_per_actor * actors, have.gpus, "GPUs")]
    for key, asked, has, unit in checks:
        if asked > has:
            if "actor" in key and actors > 1:
                what = f"features.actors x {key.split('.')[1]} = {asked:g}"
            elif "trial" in key and n > 1:
                what = f"resources.workers_per_trial x {key.split('.')[1]} = {asked:g}"
            else:
                what = f"{key}={asked:g}"
            raise ResourceError(f"{what} but the Ray cluster has {has:g} {unit}")
