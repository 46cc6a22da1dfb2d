"""Benchmark: OSE and VRF coefficient sweeps from cached logits (orch) vs. a peer's loop over
the points on the same cached outputs, and vs. re-encoding per coefficient (a plain loop
without orch's feature cache), side by side on the same data.

Data (seeded, float32): C classes with random unit prototypes; per sample a true label and
an input x = prototype[label] + Gaussian noise (N, d). Two members, each a torch "tower"
mapping x (N, d) to logits (N, C): the zero-shot one with a noisier head (lower accuracy)
and the fine-tuned one with a cleaner, sharper head. Eval sets: `id_val` (--val-samples,
default 10,000) and `id_test` (--samples, default 50,000), identity class groups. The
towers are run ONCE to fill the "cache" (both members' logits of both sets), which is
what orch's Ray Data feature cache holds.

  orch     - `trainers.ensembles.mixture.mixture_metrics(zero_shot, fine_tuned, mixture,
             eval_sets, with_ts)` for all P points at once from the cached logits, timed
             separately with with_ts=False (acc/ECE/NLL, target < 1 s on CPU at the default
             sizes) and with_ts=True (adds per-point temperature scaling, ece_ts/nll_ts).
  baseline - for EACH coefficient point: run both towers again over both sets (what a loop
             without a cache does: re-encode), p = (1-w) softmax(z_zs/T_zs) + w softmax(z_ft/T_ft)
             on the full (N, C) matrices (float32), log p (clamped at float32 tiny), then
             `trainers.metrics.accuracy`, `expected_calibration_error` and
             `negative_log_likelihood` per set on log p (softmax(log p) = p); with TS also
             `fit_temperature` on id_val and ece_ts/nll_ts per set at that temperature
             (what mixture_metrics computes). Its time per point is split into tower,
             acc/ECE/NLL and TS parts; "baseline, no TS" = tower + acc/ECE/NLL, "baseline,
             TS" = all three, from the same loop.
The tower (--tower) is `linear` (default: the head alone, d -> C, on the inputs: the
cheapest honest re-encoding, far cheaper than a real CLIP image tower, so the ratio is a
lower bound) or `mlp` (residual MLP d -> hidden -> d, L2 normalisation, head).
OSE: alpha on linspace(0, 1, P), uncalibrated (T = 1, 1), w = alpha for every sample.
VRF: a on linspace(0.5, 2.5, P), b = 0.6, w = `trainers.ensembles.vrf.sample_weights`
of per-sample squared distances drawn at random (clipped normal around 1.5, in [0, 4]),
temperatures from `member_temperatures` (confidence = accuracy on id_val). Mixture
weights, temperatures and distances are built once, outside both timings (their cost is
printed on its own line); both sides use the same ones. `--baseline-points K` times the
baseline on K evenly spaced points and scales its time to P (printed as such); by default
it runs all P. Results of both are compared on the points both computed.
peer     - (`--peer`, on by default) what the VRF authors' evaluation does on the same
           cached outputs: both members' softmaxes once, then for each of the P points the
           mixture over all classes, its argmax and max, ECE with the usual loop over 15
           bins, NLL (`peer_point`); timed over all P points against orch's with_ts=False.
With `--device cuda` the cached logits, weights and towers live on the GPU, as in an
ensemble job of a trial that has one.
Usage:
  .venv/bin/python bench/ensemble_sweep.py [--samples 50000] [--val-samples 10000]
      [--classes 1000] [--coefficients 101] [--dim 512] [--tower linear|mlp] [--hidden 1024]
      [--ensembles ose,vrf] [--no-ts] [--baseline-points K] [--threads N] [--device cpu|cuda]
      [--no-peer]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.data import EvalSet, identity_groups  # noqa: E402
from trainers.data.benchmark import ID_TEST, ID_VAL  # noqa: E402
from trainers.ensembles import MemberOutputs, Mixture, get_ensemble  # noqa: E402
from trainers.ensembles.mixture import member_temperatures, mixture_metrics  # noqa: E402
from trainers.ensembles.ose import OSEOptions  # noqa: E402
from trainers.ensembles.vrf import VRFOptions, sample_weights  # noqa: E402
from trainers.metrics import (accuracy, expected_calibration_error, fit_temperature,  # noqa: E402
                              negative_log_likelihood)
from _summary import record  # noqa: E402  (bench/ is the script's folder)

BASIC, TS = ("acc", "ece", "nll"), ("ece_ts", "nll_ts")


class Tower(nn.Module):
    """Stand-in image tower: optional residual MLP and L2 normalisation, then a linear
    head (no bias) times a logit scale."""

    def __init__(self, head: torch.Tensor, scale: float, hidden: int | None, seed: int):
        super().__init__()
        d = head.shape[1]
        gen = torch.Generator().manual_seed(seed)
        self.mlp = None
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            with torch.no_grad():   # small residual branch: keeps the class structure
                for layer in (self.mlp[0], self.mlp[2]):
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen)
                                       * 0.1 / layer.weight.shape[1] ** 0.5)
                    layer.bias.zero_()
        self.head = nn.Linear(d, head.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head * scale)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            x = x + self.mlp(x)
            x = x / x.norm(dim=1, keepdim=True)
        return self.head(x)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def make_world(args, device: torch.device):
    """Inputs and labels per set, the two towers, their cached logits."""
    gen = torch.Generator().manual_seed(args.seed)
    c, d = args.classes, args.dim
    protos = unit(torch.randn(c, d, generator=gen))
    inputs, labels = {}, {}
    for name, n in ((ID_VAL, args.val_samples), (ID_TEST, args.samples)):
        y = torch.randint(0, c, (n,), generator=gen)
        x = protos[y] + torch.randn(n, d, generator=gen) * (args.noise / d ** 0.5)
        inputs[name], labels[name] = unit(x).to(device), y.to(device)
    hidden = args.hidden if args.tower == "mlp" else None
    # ~68 % / ~80 % top-1 at 1,000 classes; both a little over-confident (T > 1), the
    # fine-tuned one more so, as CLIP zero-shot and fine-tuned models tend to be.
    heads = (unit(protos + torch.randn(c, d, generator=gen) * (1.1 / d ** 0.5)),   # zero-shot
             unit(protos + torch.randn(c, d, generator=gen) * (0.85 / d ** 0.5)))  # fine-tuned
    towers = (Tower(heads[0], 100.0, hidden, args.seed + 1).to(device).eval(),
              Tower(heads[1], 130.0, hidden, args.seed + 2).to(device).eval())
    members = tuple(MemberOutputs(logits={s: t(inputs[s]) for s in inputs}, labels=labels)
                    for t in towers)
    return inputs, labels, towers, members


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_mixture(name: str, members, n_points: int, args, device) -> tuple[Mixture, list[dict]]:
    zero_shot, fine_tuned = members
    ensemble = get_ensemble(name)
    grid = torch.linspace(0.0, 1.0, n_points) if name == "ose" else torch.linspace(0.5, 2.5, n_points)
    values = tuple(round(float(v), 6) for v in grid)
    if name == "ose":
        options = OSEOptions(alpha=values)
        points = ensemble.points(options)
        mixture = ensemble.mix(zero_shot, fine_tuned, options, points, device)
        return Mixture(mixture.temperatures,
                       {s: w.to(device) for s, w in mixture.weights.items()}), points
    options = VRFOptions(a=values, b=(0.6,))
    points = ensemble.points(options)
    gen = torch.Generator().manual_seed(args.seed + 3)
    a = torch.tensor([p["a"] for p in points], device=device)
    b = torch.tensor([p["b"] for p in points], device=device)
    weights = {}
    for s, z in zero_shot.logits.items():
        distance = (1.5 + 0.4 * torch.randn(z.shape[0], generator=gen)).clamp(0.0, 4.0)
        weights[s] = sample_weights(distance.to(device), a, b)
    return Mixture(member_temperatures(zero_shot, fine_tuned), weights), points


def baseline_point(towers, inputs, labels, temperatures, weights: dict, with_ts: bool,
                   device) -> tuple[dict, list[float]]:
    """One coefficient point the plain way; returns ({set: metrics}, [tower s, basic s, ts s])."""
    t0, t1 = temperatures
    times = [0.0, 0.0, 0.0]
    result, log_ps = {}, {}
    for s, x in inputs.items():
        start = time.perf_counter()
        z0, z1 = towers[0](x), towers[1](x)
        sync(device)
        times[0] += time.perf_counter() - start
        start = time.perf_counter()
        w = weights[s][:, None]
        p = (1 - w) * torch.softmax(z0 / t0, dim=1) + w * torch.softmax(z1 / t1, dim=1)
        log_p = p.clamp_min_(torch.finfo(torch.float32).tiny).log_()
        y = labels[s]
        result[s] = {"acc": accuracy(log_p, y), "ece": expected_calibration_error(log_p, y),
                     "nll": negative_log_likelihood(log_p, y)}
        times[1] += time.perf_counter() - start
        log_ps[s] = log_p
    if with_ts:
        start = time.perf_counter()
        temperature = fit_temperature(log_ps[ID_VAL], labels[ID_VAL])
        for s, log_p in log_ps.items():
            result[s].update(
                ece_ts=expected_calibration_error(log_p, labels[s], temperature=temperature),
                nll_ts=negative_log_likelihood(log_p, labels[s], temperature=temperature))
        times[2] += time.perf_counter() - start
    return result, times


def peer_point(probs: dict, labels: dict, weights: dict, device) -> dict:
    """One coefficient point as a peer's loop does it on cached outputs (the VRF authors'
    evaluation: both members' softmaxes computed once, then per point the mixture over
    all classes, its argmax, ECE with the usual loop over 15 bins, NLL): {set: metrics}."""
    result = {}
    for s, (p0, p1) in probs.items():
        w = weights[s][:, None]
        p = (1 - w) * p0 + w * p1                                   # (N, C)
        conf, pred = p.max(dim=1)
        y = labels[s]
        correct = (pred == y).float()
        ece = torch.zeros((), device=device)
        edges = torch.linspace(0, 1, 16, device=device)
        for lo, hi in zip(edges[:-1], edges[1:]):
            in_bin = (conf > lo) & (conf <= hi)
            share = in_bin.float().mean()
            if share > 0:
                ece += (conf[in_bin].mean() - correct[in_bin].mean()).abs() * share
        nll = -p.gather(1, y[:, None]).clamp_min(torch.finfo(p.dtype).tiny).log().mean()
        result[s] = {"acc": float(correct.mean()), "ece": float(ece), "nll": float(nll)}
    return result


def subset(members, mixture: Mixture, inputs, labels, n: int, points: int):
    """The first n samples of every set and the first `points` points (warm-up)."""
    cut = lambda d: {s: v[:n] for s, v in d.items()}   # noqa: E731
    small = tuple(MemberOutputs(logits=cut(m.logits), labels=cut(m.labels)) for m in members)
    mix = Mixture(mixture.temperatures, {s: w[:points, :n] for s, w in mixture.weights.items()})
    return small, mix, cut(inputs), cut(labels)


def fmt(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000, help="id_test samples")
    parser.add_argument("--val-samples", type=int, default=10_000, help="id_val samples")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--coefficients", type=int, default=101, help="points P per ensemble")
    parser.add_argument("--dim", type=int, default=512, help="input / feature width d")
    parser.add_argument("--tower", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP tower hidden width")
    parser.add_argument("--noise", type=float, default=4.0,
                        help="input noise norm (relative to the unit prototypes)")
    parser.add_argument("--ensembles", default="ose,vrf", help="comma-separated: ose, vrf")
    parser.add_argument("--no-ts", action="store_true", help="skip the with_ts=True runs")
    parser.add_argument("--baseline-points", type=int, default=None,
                        help="time the baseline on this many evenly spaced points and scale "
                             "to P (default: all P)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a peer's loop over the points on the cached outputs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensembles = [e.strip() for e in args.ensembles.split(",") if e.strip()]
    if not ensembles or set(ensembles) - {"ose", "vrf"}:
        parser.error("--ensembles takes ose, vrf or both")
    if args.coefficients < 2:
        parser.error("--coefficients must be >= 2")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    P = args.coefficients
    K = min(args.baseline_points or P, P)
    chosen = sorted({round(i * (P - 1) / max(K - 1, 1)) for i in range(K)})

    inputs, labels, towers, members = make_world(args, device)
    eval_sets = {s: EvalSet(name=s, dataset=None, classnames=tuple(map(str, range(args.classes))),
                            class_groups=identity_groups(args.classes)) for s in inputs}
    n_total = args.samples + args.val_samples
    # one re-encoding = both towers over both sets (a warm run first)
    for t in towers:
        t(inputs[ID_VAL][:256])
    sync(device)
    start = time.perf_counter()
    for t in towers:
        for x in inputs.values():
            t(x)
    sync(device)
    encode_s = time.perf_counter() - start

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {args.threads} torch thread(s)")
    tower = (f"linear head {args.dim}->{args.classes}" if args.tower == "linear" else
             f"residual MLP {args.dim}->{args.hidden}->{args.dim} + head {args.dim}->{args.classes}")
    print(f"Ensemble sweeps from cached logits: P={P} points x {n_total:,} samples "
          f"(id_val {args.val_samples:,} + id_test {args.samples:,}) x {args.classes:,} classes; "
          f"device {device.type} ({where})")
    print(f"member accuracy on id_test: zero-shot "
          f"{accuracy(members[0].logits[ID_TEST], labels[ID_TEST]):.3f}, fine-tuned "
          f"{accuracy(members[1].logits[ID_TEST], labels[ID_TEST]):.3f}")
    print(f"baseline tower: {tower}; one re-encoding (2 members x {n_total:,} samples): "
          f"{fmt(encode_s)}; baseline timed on {len(chosen)} of {P} points"
          + ("" if len(chosen) == P else ", scaled to P"))

    for name in ensembles:
        start = time.perf_counter()
        mixture, points = build_mixture(name, members, P, args, device)
        sync(device)
        mix_s = time.perf_counter() - start
        print(f"\n{name.upper()}: {P} points, temperatures {mixture.temperatures[0]:.3g} / "
              f"{mixture.temperatures[1]:.3g}; building the mixture (weights"
              f"{', member temperatures' if name == 'vrf' else ''}): {fmt(mix_s)}, in neither figure")

        # warm-up, on a small slice
        small, small_mix, small_in, small_lab = subset(members, mixture, inputs, labels, 512, 2)
        mixture_metrics(*small, small_mix, {s: eval_sets[s] for s in small_in}, with_ts=True)
        baseline_point(towers, small_in, small_lab, mixture.temperatures,
                       {s: w[0] for s, w in small_mix.weights.items()}, True, device)

        orch, orch_results = {}, {}
        for with_ts in ([False] if args.no_ts else [False, True]):
            sync(device)
            start = time.perf_counter()
            orch_results[with_ts] = mixture_metrics(*members, mixture, eval_sets, with_ts=with_ts)
            sync(device)
            orch[with_ts] = time.perf_counter() - start

        parts, base_results = [0.0, 0.0, 0.0], {}
        for i in chosen:
            result, times = baseline_point(towers, inputs, labels, mixture.temperatures,
                                           {s: w[i] for s, w in mixture.weights.items()},
                                           not args.no_ts, device)
            base_results[i] = result
            parts = [a + b for a, b in zip(parts, times)]
        scale = P / len(chosen)
        tower_s, basic_s, ts_s = (p * scale for p in parts)

        best = orch_results[not args.no_ts]
        keys = BASIC + (() if args.no_ts else TS)
        diff = {k: max(abs(best[i][s][k] - base_results[i][s][k])
                       for i in chosen for s in inputs) for k in keys}
        base_no_ts = tower_s + basic_s
        print(f"  acc/ECE/NLL (with_ts=False)  orch: {fmt(orch[False])}   baseline: "
              f"{fmt(base_no_ts)}   ratio (baseline/orch): {base_no_ts / orch[False]:.1f}x")
        if not args.no_ts:
            base_ts = base_no_ts + ts_s
            print(f"  + temperature scaling (True)  orch: {fmt(orch[True])}   baseline: "
                  f"{fmt(base_ts)}   ratio (baseline/orch): {base_ts / orch[True]:.1f}x")
        print(f"  baseline split: towers {fmt(tower_s)}, acc/ECE/NLL {fmt(basic_s)}"
              + ("" if args.no_ts else f", TS {fmt(ts_s)}")
              + ("" if len(chosen) == P else f" (x{scale:.2f} from {len(chosen)} points)"))
        print("  max |orch - baseline| over the baseline's points: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
        if args.peer:
            # what a peer does: softmaxes once, then a loop over all P points
            sync(device)
            start = time.perf_counter()
            t0, t1 = mixture.temperatures
            probs = {s: (torch.softmax(members[0].logits[s] / t0, dim=1),
                         torch.softmax(members[1].logits[s] / t1, dim=1)) for s in inputs}
            peer = [peer_point(probs, labels, {s: w[i] for s, w in mixture.weights.items()},
                               device) for i in range(P)]
            sync(device)
            peer_s = time.perf_counter() - start
            del probs
            gap = {k: max(abs(orch_results[False][i][s][k] - peer[i][s][k])
                          for i in range(P) for s in inputs) for k in BASIC}
            print(f"  peer loop on cached outputs (acc/ECE/NLL, {P} points): {fmt(peer_s)}   "
                  f"orch: {fmt(orch[False])}   ratio (peer/orch): {peer_s / orch[False]:.1f}x "
                  "(target >= 20x)")
            print("  max |orch - peer|: " + ", ".join(f"{k} {v:.1e}" for k, v in gap.items()))
            size = f"{P} points x {args.samples // 1000}k x {args.classes:,} classes"
            record(f"{name.upper()} sweep, {size}, vs a peer's loop on cached outputs",
                   f"{orch[False]:.2f} s", f"{peer_s:.1f} s", f"{peer_s / orch[False]:.1f}x",
                   ">= 20x", peer_s / orch[False] >= 20)


if __name__ == "__main__":
    main()
