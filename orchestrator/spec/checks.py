"""The checks of a parsed spec against this machine: folders and files exist, CSV splits
cover every class, and the model is one open_clip can build (no network: whether its
weights can be downloaded is `orch sweep`'s check at its start)."""
from __future__ import annotations

from pathlib import Path

import open_clip

from orchestrator.spec.schema import SpecError
from orchestrator.spec.types import ModelSpec, SweepSpec
from trainers.data import DataError
from trainers.data.folders import check_csv_classes
from trainers.data.suites import SUITES
from trainers.models import RANDOM_INIT, TOY, model_problem, names_a_file


def check_spec_paths(spec: SweepSpec) -> None:
    """Missing folders and files fail here, with the field that names them."""
    b = spec.benchmark
    if b.source == "imagefolder":
        if b.root is None:
            raise SpecError("benchmark.root", "required for source imagefolder")
        require(Path(b.root), "benchmark.root", folder=True)
    if b.source == "csv":
        for split in ("train", "val", "test"):
            if getattr(b, split) is None:
                raise SpecError(f"benchmark.{split}", "required for source csv (a path,label file)")
            require(Path(getattr(b, split)), f"benchmark.{split}", folder=False)
        if not b.classnames:
            raise SpecError("benchmark.classnames", "required for source csv")
        for split in ("train", "val", "test"):   # every class has rows in every ID split
            try:
                check_csv_classes(Path(getattr(b, split)), b.classnames)
            except DataError as err:
                raise SpecError(f"benchmark.{split}", str(err)) from None
    if b.suite is not None:
        if b.root is None:
            raise SpecError("benchmark.root", f"required for suite {b.suite}")
        require(Path(b.root), "benchmark.root", folder=True)
        if SUITES[b.suite].domains and b.domain is None:
            raise SpecError("benchmark.domain", f"required for suite {b.suite}: its ID domain, "
                            f"one of {', '.join(SUITES[b.suite].domains)}")
    for name, shift in b.shifts.items():
        require(Path(shift.path), f"benchmark.shifts.{name}" + ("" if b.suite else ".path"),
                folder=shift.format == "imagefolder")
    if b.source == "toyworld" and b.shifts:
        raise SpecError("benchmark.shifts", "the toy world brings its own shifts")
    check_model(spec.model)


def check_model(model: ModelSpec) -> None:
    """The toy CLIP takes no `pretrained`; a real architecture is one open_clip knows
    (with its `config` registered) and names its weights (`trainers.models.model_problem`),
    and a checkpoint or config file exists."""
    if model.arch == TOY:
        if model.pretrained:
            raise SpecError("model.pretrained", "the toy CLIP is pre-trained by orch; leave it unset")
        return
    if model.config:
        require(Path(model.config), "model.config", folder=False)
        open_clip.add_model_config(Path(model.config))
    if model.pretrained and model.pretrained != RANDOM_INIT and names_a_file(model.pretrained):
        require(Path(model.pretrained), "model.pretrained", folder=False)
    problem = model_problem(model.arch, model.pretrained, required=True)
    if problem:
        raise SpecError(*problem)


def require(path: Path, where: str, folder: bool) -> None:
    path = path.expanduser()
    if folder and not path.is_dir():
        raise SpecError(where, f"folder {path.resolve()} does not exist")
    if not folder and not path.is_file():
        raise SpecError(where, f"file {path.resolve()} does not exist")
