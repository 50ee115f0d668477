"""`bench-report`: read a pytest-benchmark JSON file and say what it measured.

- a table of every benchmark: its unit, median and p90/p99, achieved FLOP/s, MFU,
  images or tokens per second, the roofline prediction and the ratio to the peer;
- the prediction check: per group with predictions (the plans on the CPU mesh), predicted
  against measured latency and their Spearman rank correlation, with how far the timing
  noise alone moves that correlation (a bootstrap over each plan's timed rounds);
- `--compare OLD`: benchmarks whose median grew beyond the threshold, with a non-zero exit.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np
from scipy.stats import bootstrap, rankdata, spearmanr

from modelapi.errors import UserError


class BenchReportError(UserError):
    pass


@dataclass
class Bench:
    name: str
    group: str
    median: float
    info: dict


def load(path: Path) -> list[Bench]:
    path = Path(path)
    if not path.is_file():
        raise BenchReportError(f"{path}: not found; write it with `pytest bench/ --benchmark-json {path}`")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise BenchReportError(f"{path}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise BenchReportError(f"{path}: not a text file; expected pytest-benchmark JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchReportError(f"{path}: no 'benchmarks' list; is this pytest-benchmark output?")
    try:
        return [Bench(b["fullname"], b.get("group") or "", float(b["stats"]["median"]), b.get("extra_info") or {})
                for b in data["benchmarks"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BenchReportError(f"{path}: a benchmark entry lacks fullname or stats.median; is this "
                               "pytest-benchmark output?") from None


def _fmt(x, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    return "" if x is None else f"{x * scale:.{digits}g}{unit}"


def rows(benches: list[Bench]) -> list[list[str]]:
    out = []
    for b in benches:
        u, i = b.info.get("unit", {}), b.info
        out.append([b.group, u.get("entry", ""), u.get("plan", ""), u.get("precision", ""), str(u.get("batch", "")),
                    _fmt(b.median, scale=1e3), _fmt(i.get("p90_s"), scale=1e3), _fmt(i.get("p99_s"), scale=1e3),
                    _fmt(i.get("achieved_flops_per_s"), scale=1e-9), _fmt(i.get("mfu"), "%", 100, 2),
                    _fmt(i.get("items_per_s"), f" {i.get('item', '')}/s"),
                    _fmt(i.get("predicted_s") or None, scale=1e3), _fmt(i.get("peer_ratio"), "x")])
    return out


HEADERS = ["group", "entry", "plan", "precision", "batch", "median ms", "p90 ms", "p99 ms", "GFLOP/s", "MFU",
           "throughput", "predicted ms", "vs peer"]


@dataclass
class PlanTiming:
    plan: str
    predicted: float
    measured: float             # median seconds
    binding: str
    rounds: list[float] | None  # every timed round, where recorded
    whole_program: float | None = None


def _timings(benches: list[Bench]) -> tuple[dict, dict]:
    """(each plan timed on its own, every plan timed in turns) per (group, entry)."""
    alone: dict[tuple, list[PlanTiming]] = {}
    in_turns: dict[tuple, list[PlanTiming]] = {}
    for b in benches:
        if not (b.info.get("timed") and b.group.startswith("plans")):
            continue
        key = (b.group, b.info["unit"]["entry"])
        if b.info.get("in_turns"):   # bench/test_plans.py::test_plans_in_turns
            in_turns[key] = [PlanTiming(plan, t["predicted_s"], float(np.median(t["rounds_s"])), t.get("binding", ""),
                                        t["rounds_s"]) for plan, t in b.info["in_turns"].items()]
        elif b.info.get("predicted_s"):
            alone.setdefault(key, []).append(PlanTiming(
                b.info["unit"]["plan"], b.info["predicted_s"], b.median, b.info.get("binding", ""),
                b.info.get("rounds_s"), b.info.get("predicted_whole_program_s")))
    return alone, in_turns


def prediction_check(benches: list[Bench]) -> list[dict]:
    """Per (group, entry) with at least 3 predicted units: Spearman ρ of predicted vs measured
    (does the model rank plans right?) and the median of |predicted − measured| / measured
    (how far off are its numbers?), the two fidelity figures issue 13 sets goals for.
    Measured where the run has them means the plans timed in turns (`measured_in`
    "turns"), side by side, else each plan's own rounds ("alone"; `alone_rho` is their
    correlation beside the turns')."""
    alone, in_turns = _timings(benches)
    out = []
    for key in sorted(set(alone) | set(in_turns)):
        rows = in_turns.get(key) or alone[key]
        if len(rows) < 3:
            continue
        predicted, measured = [r.predicted for r in rows], [r.measured for r in rows]
        rho, median_error = _fidelity(predicted, measured)
        # bench/test_plans.py also records the whole-program roofline, for the before/after
        whole = {r.plan: r.whole_program for r in alone.get(key, [])}
        rho_whole, error_whole = (_fidelity([whole[r.plan] for r in rows], measured)
                                  if all(whole.get(r.plan) for r in rows) else (None, None))
        own = alone.get(key, [])
        rho_alone = _fidelity([r.predicted for r in own], [r.measured for r in own])[0] \
            if key in in_turns and len(own) >= 3 else None
        rounds = [r.rounds for r in rows]
        noise = rank_noise(predicted, rounds) if all(rounds) else {"interval": None, "self": None}
        out.append({"group": key[0], "entry": key[1], "rho": rho, "median_rel_error": median_error,
                    "measured_in": "turns" if key in in_turns else "alone", "alone_rho": rho_alone,
                    "whole_program_rho": rho_whole, "whole_program_median_rel_error": error_whole,
                    "rho_interval": noise["interval"], "measurement_rho": noise["self"],
                    "overestimates": sum(p > m for p, m in zip(predicted, measured)),
                    "plans": [(r.plan, r.predicted, r.measured, r.binding)
                              for r in sorted(rows, key=lambda r: r.measured)]})
    return out


def _fidelity(predicted: list[float], measured: list[float]) -> tuple[float, float | None]:
    """(Spearman ρ, median |predicted − measured| / measured)."""
    errors = sorted(abs(p - m) / m for p, m in zip(predicted, measured) if m > 0)
    return float(spearmanr(predicted, measured).statistic), float(median(errors)) if errors else None


def rank_noise(predicted: list[float], rounds: list[list[float]], resamples: int = 2000,
               seed: int = 0) -> dict:
    """How much of a rank correlation the timing noise decides (scipy.stats.bootstrap,
    percentile method, one sample per plan): each resample draws every plan's timed rounds
    again with replacement and takes their medians. `interval` is the 5th-95th percentile of
    ρ(predicted, resampled medians); `self` is the mean of ρ(measured medians, resampled
    medians), the correlation a predictor that knew the measured medians exactly would be
    expected to reach against a repeat of this measurement. Either is None where its ranks
    all tie. Where `self` sits under a goal, the measurement cannot resolve the ranking that
    finely, whatever the model."""
    samples = [np.asarray(r, dtype=float) for r in rounds]
    medians = [float(np.median(r)) for r in samples]
    references = np.stack([rankdata(predicted), rankdata(medians)], axis=-1)   # (plans, 2)
    references = references - references.mean(axis=0)

    def rho(*drawn, axis=-1):   # Pearson of ranks: every resample's medians against both references
        ranks = rankdata(np.stack([np.median(d, axis=axis) for d in drawn], axis=-1), axis=-1)
        ranks = ranks - ranks.mean(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.moveaxis((ranks @ references) / (np.linalg.norm(ranks, axis=-1, keepdims=True)
                                                        * np.linalg.norm(references, axis=0)), -1, 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # scipy warns of degenerate data where every resample agrees
        result = bootstrap(samples, rho, n_resamples=resamples, confidence_level=0.90, method="percentile",
                           vectorized=True, rng=np.random.default_rng(seed))
    against_prediction, against_itself = result.bootstrap_distribution
    interval = tuple(float(x) for x in np.nanpercentile(against_prediction, [5, 95])) \
        if np.isfinite(against_prediction).any() else None
    itself = float(np.nanmean(against_itself)) if np.isfinite(against_itself).any() else None
    return {"interval": interval, "self": itself}


def compare(new: list[Bench], old: list[Bench], threshold: float) -> list[tuple[str, float, float]]:
    before = {b.name: b.median for b in old}
    return [(b.name, before[b.name], b.median) for b in new
            if b.name in before and b.median > before[b.name] * (1 + threshold)]
