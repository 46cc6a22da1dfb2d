"""Datasets, benchmarks (ID task + OOD shifts) and class-space mappings.

``benchmark`` holds the containers (:class:`Benchmark`, :class:`EvalSet`, the datasets) and the
class-group helpers; ``folders`` builds a benchmark from image folders and CSV lists on disk;
``suites`` builds the named benchmarks (ImageNet and its shifts, DomainNet) from their own layouts.
"""

from .benchmark import (
    ArrayImageDataset,
    ArrayNormalize,
    Benchmark,
    DataError,
    EvalSet,
    FileImageDataset,
    identity_groups,
    mapped_groups,
    ood_average,
    subset_groups,
)
from .folders import (
    IMAGE_EXTENSIONS,
    ShiftSource,
    load_csv_split,
    load_imagefolder_benchmark,
    load_shift,
)

__all__ = [
    "ArrayImageDataset",
    "ArrayNormalize",
    "Benchmark",
    "DataError",
    "EvalSet",
    "FileImageDataset",
    "IMAGE_EXTENSIONS",
    "ShiftSource",
    "identity_groups",
    "load_csv_split",
    "load_imagefolder_benchmark",
    "load_shift",
    "mapped_groups",
    "ood_average",
    "subset_groups",
]
