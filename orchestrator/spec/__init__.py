"""What to run: a sweep file read (`load`), parsed into frozen dataclasses (`parse`,
`types`, with `schema`'s typed YAML), checked against this machine (`checks`), with its
plug-ins imported (`plugins`) and its JSON Schema for editors (`jsonschema`)."""
from orchestrator.spec.load import apply_overrides, load_spec, read_sweep_text
from orchestrator.spec.parse import parse_spec
from orchestrator.spec.schema import SpecError
from orchestrator.spec.types import (BenchmarkSpec, EnsembleEntry, EvalSpec, FeaturesSpec,
                                     MethodEntry, ModelSpec, ResourcesSpec, ShiftSpec, SweepSpec)

__all__ = ["BenchmarkSpec", "EnsembleEntry", "EvalSpec", "FeaturesSpec", "MethodEntry",
           "ModelSpec", "ResourcesSpec", "ShiftSpec", "SpecError", "SweepSpec",
           "apply_overrides", "load_spec", "parse_spec", "read_sweep_text"]
