"""Objects built from a spec, without Ray: the model (`models`), the benchmark and the
caches a sweep needs first (`benchmarks`), the check that every image opens (`images`),
and what a process loads once and shares (`loaded`: the assets, fitted models, the model
of a point)."""
