"""``pkm-ref bench``: measured speed of memory layers, beside the analytic cost model.

Taught in ``notebooks/06_complexity_and_speed.ipynb``, which loads the committed results.

    python -m pkm_ref bench retrieval|layer|model|all [--profile smoke|cpu|gpu]
        [--device cpu|cuda] [--sizes 12 14 16 ...] [--repeat N] [--rounds N] [--threads N]

``--sizes`` are exponents e of the number of slots N = 2^e (even, so that n_keys = 2^(e/2)).
Every case uses the paper's retrieval setting: d_model 256, k_dim 128, 4 heads, knn 32, float32.

* ``retrieval``: flat-key vs product-key search, each followed by the value read, for a batch of
  queries (eval, no grad); the readable reference product search beside the fast default one; the
  value read alone.
* ``layer``: ``ProductKeyMemory`` forward (eval) and forward + backward (train) vs the dense FFN it
  replaces (hidden 4 * d_model); one optimizer step of the value table, Adam on dense gradients vs
  SparseAdam on sparse ones, for growing tables.
* ``model``: inference tokens/s of the language model vs memory size with flat and product keys
  (the paper's speed figure), and dense L layers vs dense 2L vs L layers + a memory.

A bench runs ``rounds`` times in one command, each round a complete, independent measurement
(fresh inputs and modules, the machine's limits measured again). Within a round every time is the
median of ``repeat`` runs after a warm-up; GPU runs are timed with CUDA events, CPU runs with a
fixed, recorded thread count. Every number of the results is the mean over the rounds with its 95 %
interval (``pkm_ref.stats``), and every ratio is taken within a round, then averaged. Each round
also measures the machine's limits, memory bandwidth (bytes/s) and matmul throughput (FLOP/s), so
that the product layer can be compared with its lower bound:

    bound = value bytes read / bandwidth + (query + sub-key) FLOPs / matmul throughput.

Results go through ``pkm_ref.figures`` (``bench_<name>.json``/``.md``/``.png``). The issue's goals
are printed as met (the whole interval clears the target), not met (the whole interval misses it)
or within noise; benchmarks are measurements, never timed tests.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pkm_ref import cost, figures, stats
from pkm_ref.memory import ProductKeyMemory
from pkm_ref.profiles import (
    add_device_argument,
    add_profile_argument,
    by_profile,
    current_profile,
    profile_device,
)
from pkm_ref.read import read_bags
from pkm_ref.search import flat_topk, product_topk

BENCHES = ("retrieval", "layer", "model")
D_MODEL, K_DIM, HEADS, KNN = 256, 128, 4, 32  # the paper's setting, used by every bench
DTYPE = torch.float32


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one bench run; ``by_profile`` fills the defaults."""

    profile: str
    device: torch.device
    sizes: tuple[int, ...]  # exponents e: N = 2^e slots
    queries: int  # tokens per retrieval or layer call
    repeat: int  # timed runs per measurement in a round (their median)
    rounds: int  # independent repetitions of the whole bench (the spread of the results)
    flat_queries: int  # flat search runs on this many of the queries, scaled to ``queries``
    flat_max_exponent: int  # no flat keys beyond 2^this slots (time and memory)
    model_flat_max_exponent: int
    optimizer_max_exponent: int
    model_batch: tuple[int, int]  # (B, T) tokens per model forward
    bandwidth_bytes: int  # size of the bandwidth probe
    matmul_size: int  # n of the n x n sgemm probe

    @property
    def threads(self) -> int:
        return torch.get_num_threads()


def default_settings(profile: str, device: torch.device) -> Settings:
    """smoke: every code path in seconds; cpu: about five minutes for the three benches on 2
    cores, peak memory under 6 GB; gpu: minutes on an H100.

    cpu measures three sizes (2^12, 2^16, 2^20: the ends the goals compare, and the middle) in
    three rounds of two timed runs each, flat keys on 64 queries and in the language model up to
    2^16 slots: three rounds cost about what one round of five sizes did.
    """
    return Settings(
        profile=profile,
        device=device,
        sizes=by_profile((8, 10), (12, 16, 20), (12, 14, 16, 18, 20, 22, 24), profile),
        queries=by_profile(256, 4096, 4096, profile),
        repeat=by_profile(2, 2, 5, profile),
        rounds=by_profile(2, 3, 3, profile),
        flat_queries=by_profile(256, 64, 1024, profile),
        flat_max_exponent=by_profile(10, 20, 24, profile),
        model_flat_max_exponent=by_profile(10, 16, 22, profile),
        optimizer_max_exponent=by_profile(10, 20, 22, profile),
        model_batch=by_profile((2, 32), (4, 256), (32, 256), profile),
        bandwidth_bytes=by_profile(1 << 25, 1 << 30, 1 << 32, profile),
        matmul_size=by_profile(256, 2048, 8192, profile),
    )


# --- Timing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Median, interquartile range and fastest of repeated runs, in seconds."""

    median_s: float
    iqr_s: float
    runs: int
    best_s: float | None = None  # the fastest run (None: not from runs)

    @classmethod
    def from_runs(cls, seconds: list[float]) -> Timing:
        if len(seconds) < 2:
            return cls(seconds[0], 0.0, len(seconds), seconds[0])
        q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
        return cls(statistics.median(seconds), q3 - q1, len(seconds), min(seconds))

    def scaled(self, factor: float) -> Timing:
        best = None if self.best_s is None else self.best_s * factor
        return Timing(self.median_s * factor, self.iqr_s * factor, self.runs, best)


def measure(fn: Callable[[], object], repeat: int, device: torch.device, warmup: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones (CUDA events on GPU)."""
    return measure_in_turns({"fn": fn}, repeat, device, warmup)["fn"]


def measure_in_turns(
    fns: dict[Hashable, Callable[[], object]], repeat: int, device: torch.device, warmup: int = 1
) -> dict[Hashable, Timing]:
    """Time several functions in turns: ``warmup`` untimed calls of each, then ``repeat`` rounds of
    one timed call of each. When the machine's speed drifts during a run (a shared virtual machine,
    a GPU changing clocks), every function sees the same drift, so their ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds: dict[Hashable, list[float]] = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            seconds[key].append(_seconds_of_one_call(fn, device))
    return {key: Timing.from_runs(runs) for key, runs in seconds.items()}


def _seconds_of_one_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


# --- Machine limits ------------------------------------------------------------------------------


# The machine's limits come from its fastest probe run, not the median: the lower bound is what
# the machine can do at best, and a median on a busy or shared machine would loosen it.


def memory_bandwidth(device: torch.device, n_bytes: int = 1 << 30, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s: the sum of a float32 tensor far larger than the caches."""
    data = torch.ones(n_bytes // 4, device=device)  # (n_bytes / 4,)
    return n_bytes / measure(data.sum, repeat, device).best_s


def matmul_throughput(device: torch.device, size: int = 2048, repeat: int = 5) -> float:
    """sgemm throughput in FLOP/s: 2 * size^3 for one float32 (size x size) @ (size x size)."""
    a = torch.randn(size, size, device=device)  # (n, n)
    b = torch.randn(size, size, device=device)  # (n, n)
    return 2 * size**3 / measure(lambda: a @ b, repeat, device).best_s


def machine_limits(s: Settings) -> dict:
    """Measured bandwidth (GB/s) and matmul throughput (GFLOP/s) of this run's device."""
    return {
        "memory_bandwidth_GBps": memory_bandwidth(s.device, s.bandwidth_bytes) / 1e9,
        "matmul_GFLOPps": matmul_throughput(s.device, s.matmul_size) / 1e9,
    }


def product_lower_bound_s(n_keys: int, tokens: int, limits: dict) -> float:
    """Least time a product-key layer can take: its value bytes at full bandwidth plus its query
    and sub-key FLOPs at full matmul speed (2 * tokens * (d_model * H * k_dim + H * n * k_dim))."""
    layer = cost.product_memory_cost(D_MODEL, D_MODEL, n_keys, K_DIM, HEADS, KNN)
    flops = 2 * tokens * (D_MODEL * HEADS * K_DIM + HEADS * n_keys * K_DIM)
    read_s = tokens * layer.value_bytes / (limits["memory_bandwidth_GBps"] * 1e9)
    return read_s + flops / (limits["matmul_GFLOPps"] * 1e9)


# --- Cost-model curves ---------------------------------------------------------------------------


def analytic_work(kind: str, slots: list[int]) -> list[float]:
    """Multiply-adds per token from ``pkm_ref.cost``: O(N) for flat keys, O(sqrt(N) + k^2) for
    product keys (query network and value read included)."""
    if kind == "flat":
        return [cost.flat_memory_cost(D_MODEL, D_MODEL, n, K_DIM, HEADS, KNN).multiply_adds
                for n in slots]  # fmt: skip
    return [cost.product_memory_cost(D_MODEL, D_MODEL, math.isqrt(n), K_DIM, HEADS, KNN)
            .multiply_adds for n in slots]  # fmt: skip


def scale_to_measured(model: list[float], measured: list[float | None]) -> list[float]:
    """``model`` times the one factor that best fits ``measured`` on a log scale (the geometric
    mean of measured / model over the measured points): a curve's shape, drawn through the data."""
    logs = [math.log(m / w) for w, m in zip(model, measured, strict=True) if m]
    if not logs:
        raise ValueError("no measured point to scale the curve to")
    factor = math.exp(sum(logs) / len(logs))
    return [factor * w for w in model]


# --- Goals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """One of the issue's speed goals: ``value`` must be <= or >= ``target``.

    ``value`` holds one measurement per round; the goal is met only when its whole 95 % interval
    clears the target (``stats.goal``).
    """

    text: str
    value: stats.Estimate | None  # None when this run did not measure it
    target: float
    at_most: bool

    @property
    def status(self) -> stats.GoalStatus | None:
        """``met``, ``not met``, ``within noise``, or None when not measured."""
        if self.value is None:
            return None
        return stats.goal(self.value, self.target, self.at_most)

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        if self.value is None:
            return f"goal {self.text} {sign} {self.target:g}: not measured in this run"
        value = self.value
        if value.n < 2:
            spread = "one round: no interval"
        else:
            spread = f"95 % interval {value.low:.3g} to {value.high:.3g}, {value.n} rounds"
        return (f"goal {self.text} {sign} {self.target:g}: {value.mean:.3g} ({spread}) -> "
                f"{self.status}")  # fmt: skip


def _ratio(
    numerator: stats.Estimate | None, denominator: stats.Estimate | None
) -> stats.Estimate | None:
    """numerator / denominator within each round, or None when either was not measured."""
    if numerator is None or denominator is None:
        return None
    return stats.ratio(numerator, denominator)


# --- Rows ----------------------------------------------------------------------------------------


def _row(case: str, slots: int | None, timing: Timing | None, **extra: float | None) -> dict:
    """One measurement of one round: a case at a memory size, the median time in milliseconds
    (None: not measured) and the number of timed runs it is the median of."""
    return {
        "case": case,
        "slots": slots,
        "median_ms": None if timing is None else timing.median_s * 1e3,
        "runs": None if timing is None else timing.runs,
        **extra,
    }


# Columns that name a measurement or describe how it was taken: equal in every round.
_LABELS = ("case", "slots", "runs", "timed_queries")


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """The rows of several rounds as one table: each measured number becomes a ``stats.Estimate``
    over the rounds (as JSON; None when some round did not measure it), ``rounds`` says how many.
    """
    combined = []
    for same in zip(*rounds, strict=True):  # the same measurement in every round
        first = same[0]
        if any((r["case"], r["slots"]) != (first["case"], first["slots"]) for r in same):
            raise ValueError("rounds measured different cases: they cannot be combined")
        row = {key: first[key] for key in first if key in _LABELS}
        for key in first:
            if key not in _LABELS:
                values = [r[key] for r in same]
                measured = all(v is not None for v in values)
                row[key] = stats.Estimate.of(values).to_json() if measured else None
        combined.append({**row, "rounds": len(same)})
    return combined


def lookup(
    rows: list[dict], case: str, slots: int | None, column: str = "median_ms"
) -> stats.Estimate | None:
    """The ``column`` of the row for (case, slots) as an Estimate, or None (not measured).

    Reads results of any version: a plain number (written before rounds existed) is one value.
    """
    for row in rows:
        if row["case"] == case and row["slots"] == slots:
            return stats.read(row.get(column))
    return None


def errorbar(ax, xs: list, estimates: list[stats.Estimate], style: str, **options) -> None:
    """Means with bars from the lowest to the highest round: the spread the figures show (the
    tables give the 95 % interval). Always positive, so it suits log axes."""
    means = [e.mean for e in estimates]
    spread = [[m - min(e.values) for m, e in zip(means, estimates, strict=True)],
              [max(e.values) - m for m, e in zip(means, estimates, strict=True)]]  # fmt: skip
    ax.errorbar(xs, means, yerr=spread, fmt=style, **{"capsize": 2, **options})


def plot_case(
    ax, rows: list[dict], case: str, style: str, column: str = "median_ms", **options
) -> None:
    """Draw ``column`` against slots for the measured rows of ``case`` (mean, min-max bars)."""
    points = sorted((row["slots"], lookup(rows, case, row["slots"], column)) for row in rows
                    if row["case"] == case and row["slots"] and row.get(column))  # fmt: skip
    if points:
        slots, estimates = zip(*points, strict=True)
        errorbar(ax, list(slots), list(estimates), style, **{"label": case, **options})


def _uniform(bound: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.empty(shape, device=device).uniform_(-bound, bound)


# --- retrieval -----------------------------------------------------------------------------------

RETRIEVAL_CASES = ("flat keys", "product keys (reference)", "product keys", "value read",
                   "value read (compiled)")  # fmt: skip


def read_values(
    values: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, compiled: bool = False
) -> torch.Tensor:
    """The memory read of ``pkm_ref.memory``: softmax weights, one summed bag of H * knn rows,
    read by EmbeddingBag or (``compiled``) by the layer's ``compiled_read`` path.

    values (N, D); scores, indices (M, H, knn) -> (M, D).
    """
    weights = F.softmax(scores.float(), dim=-1).flatten(1)  # (M, H * knn)
    method = "compiled" if compiled else "embedding_bag"
    return read_bags(values, indices.flatten(1), weights, method)  # (M, D)


def _progress(items, what: str):
    """``items`` with a progress bar on a terminal (stderr; none in notebooks, logs or CI)."""
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="size", leave=False, disable=None)


def bench_retrieval(s: Settings, limits: dict) -> list[dict]:
    """Search + value read for each size: flat, product (reference), product (fast), read alone."""
    sizes = _progress(s.sizes, "retrieval")
    return [row for exponent in sizes for row in _retrieval_at(exponent, s)]


def _retrieval_at(exponent: int, s: Settings) -> list[dict]:
    n_keys, slots = 2 ** (exponent // 2), 2**exponent
    query = torch.randn(s.queries, HEADS, K_DIM, device=s.device)  # (M, H, k_dim)
    subkeys = _uniform((K_DIM // 2) ** -0.5, (HEADS, 2, n_keys, K_DIM // 2), s.device)
    values = torch.randn(slots, D_MODEL, device=s.device) * D_MODEL**-0.5  # (N, d_model)

    def product(method: str) -> torch.Tensor:
        return read_values(values, *product_topk(query, subkeys, KNN, method=method))  # (M, D)

    with torch.no_grad():
        scores, indices = product_topk(query, subkeys, KNN)  # (M, H, knn) each
        timings = measure_in_turns({
            "product keys": lambda: product("fast"),
            "product keys (reference)": lambda: product("reference"),
            "value read": lambda: read_values(values, scores, indices),
            "value read (compiled)": lambda: read_values(values, scores, indices, compiled=True),
        }, s.repeat, s.device)  # fmt: skip
        flat = _time_flat(s, exponent, query, values)
    read_bytes = s.queries * HEADS * KNN * D_MODEL * values.element_size()
    # timed_queries: the flat search is timed on fewer queries and its time scaled to all of them.
    flat_queries = min(s.flat_queries, s.queries) if flat is not None else None
    return [_row("flat keys", slots, flat, GBps=None, timed_queries=flat_queries)] + [
        _row(case, slots, timings[case],
             GBps=read_bytes / timings[case].median_s / 1e9 if "read" in case else None,
             timed_queries=s.queries)
        for case in RETRIEVAL_CASES[1:]
    ]  # fmt: skip


def _time_flat(s: Settings, exponent: int, query: torch.Tensor, values: torch.Tensor):
    """Flat search + read on ``flat_queries`` queries, scaled to all; None if too big to hold."""
    if exponent > s.flat_max_exponent:
        return None
    part = query[: s.flat_queries]  # (m, H, k_dim)
    try:
        keys = _uniform(K_DIM**-0.5, (HEADS, 2**exponent, K_DIM), s.device)  # (H, N, k_dim)
        timing = measure(lambda: read_values(values, *flat_topk(part, keys, KNN)), s.repeat,
                         s.device)  # fmt: skip
    except torch.cuda.OutOfMemoryError:  # flat keys of a large memory may not fit on the GPU
        return None
    return timing.scaled(s.queries / part.shape[0])


def retrieval_goals(rows: list[dict], meta: dict) -> list[Goal]:
    """flat / product at 2^20 slots (>= 150x CPU, >= 100x GPU); GPU: the value read at >= 50% of
    the measured memory bandwidth, by the faster of the two reads (EmbeddingBag, compiled)."""
    slots, gpu = 2**20, meta["device_type"] == "cuda"
    flat_over_product = _ratio(
        lookup(rows, "flat keys", slots), lookup(rows, "product keys", slots)
    )
    goals = [Goal("flat / product at 2^20 slots", flat_over_product, 100 if gpu else 150, False)]
    if gpu:
        reads = {case: lookup(rows, case, slots, "GBps") for case in RETRIEVAL_CASES[3:]}
        best = max(reads, key=lambda case: reads[case].mean if reads[case] else 0.0)
        bandwidth = meta["memory_bandwidth_GBps"]  # the mean of the rounds' probes
        share = None if reads[best] is None else stats.Estimate.of(
            value / bandwidth for value in reads[best].values
        )  # fmt: skip
        goals.append(Goal(f"{best} / memory bandwidth at 2^20", share, 0.5, False))
    return goals


def retrieval_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Means over the rounds (``format_table`` prints them); ratios are taken within rounds."""
    header = ["slots", "flat ms", "ref ms", "product ms", "flat/product", "ref/product",
              "read GB/s", "compiled GB/s"]  # fmt: skip
    lines = []
    for slots in sorted({row["slots"] for row in rows}):
        flat, ref, fast = (lookup(rows, case, slots) for case in RETRIEVAL_CASES[:3])
        reads = [lookup(rows, case, slots, "GBps") for case in RETRIEVAL_CASES[3:]]
        lines.append([slots, flat, ref, fast, _ratio(flat, fast), _ratio(ref, fast), *reads])
    return header, lines


def plot_retrieval(rows: list[dict], meta: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    slots = sorted({row["slots"] for row in rows})
    styles = ("o-", "s-", "D-", "^:", "v:")
    flat_queries = min(meta["flat_queries"], meta["queries"])
    flat_label = f"flat keys (timed on {flat_queries} queries, scaled)"
    for i, (case, style) in enumerate(zip(RETRIEVAL_CASES, styles, strict=True)):
        label = flat_label if case == "flat keys" else case
        plot_case(ax, rows, case, style, color=f"C{i}", label=label)
    for kind, case, color, label in (("flat", "flat keys", "C0", "O(N)"),
                                     ("product", "product keys", "C2", "O(√N + k²)")):  # fmt: skip
        measured = [None if e is None else e.mean for e in (lookup(rows, case, n) for n in slots)]
        if any(measured):
            curve = scale_to_measured(analytic_work(kind, slots), measured)
            ax.plot(slots, curve, "--", color=color, alpha=0.5, label=f"cost model: {label}")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="memory slots N",
           ylabel=f"time per {meta['queries']} queries (ms)",
           title=f"Retrieval: flat vs product keys ({meta['device']})")  # fmt: skip
    ax.legend(fontsize=8, title=_spread_title(rows), title_fontsize=7)
    return fig


# --- layer ---------------------------------------------------------------------------------------


def dense_ffn(d_model: int = D_MODEL) -> nn.Module:
    """The dense FFN a memory layer replaces: Linear(d, 4d) -> GELU -> Linear(4d, d)."""
    hidden = 4 * d_model
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


def train_step_timing(module: nn.Module, x: torch.Tensor, s: Settings) -> Timing:
    """One training forward + backward of ``module`` on ``x`` (no optimizer step)."""
    module.train()

    def train_step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    timing = measure(train_step, s.repeat, s.device)
    # The last step's gradients are not needed: for a 2^20-slot layer the sparse value gradient
    # alone is 0.5 GB (one row per read: tokens x heads x knn rows of d_model floats).
    module.zero_grad(set_to_none=True)
    return timing


def value_step_timing(slots: int, sparse: bool, s: Settings) -> Timing:
    """One training step of a value table alone: read, backward, optimizer step.

    Adam on the dense gradient touches all N * d_model weights and both moments; SparseAdam on the
    sparse gradient only the H * knn rows each token read.
    """
    table = nn.EmbeddingBag(slots, D_MODEL, mode="sum", sparse=sparse).to(s.device)
    optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(table.parameters(), 1e-3)
    indices = torch.randint(slots, (s.queries, HEADS * KNN), device=s.device)  # (M, H * knn)
    weights = torch.rand(s.queries, HEADS * KNN, device=s.device)  # (M, H * knn)

    def step():
        optimizer.zero_grad(set_to_none=True)
        table(indices, per_sample_weights=weights).sum().backward()
        optimizer.step()

    return measure(step, s.repeat, s.device)


def bench_layer(s: Settings, limits: dict) -> list[dict]:
    """Product-key layer vs FFN, its lower bound, and the value optimizer step, for each size.

    The eval forwards of the FFN and of every memory size are timed in turns
    (``measure_in_turns``), so the size ratios that the goals check compare like with like.

    Memory: every layer is alive for the forwards (1.1 GiB of value tables at cpu sizes); then
    each is freed after its train step, before the value optimizer steps of its size: a 2^20-row
    table's Adam step needs 6 GiB on its own (table, dense gradient, Adam's two moments and two
    temporaries of its update). Keeping every layer alive to the end, with its last gradients,
    took the cpu bench to 11 GB.
    """
    x = torch.randn(s.queries, D_MODEL, device=s.device)  # (M, d_model)
    ffn = dense_ffn().to(s.device).eval()
    layers = {}
    for exponent in s.sizes:
        with s.device:  # built in place: a 2^24-row value table is 16 GiB to initialise
            layers[2**exponent] = ProductKeyMemory(
                D_MODEL, D_MODEL, 2 ** (exponent // 2), K_DIM, HEADS, KNN, sparse=True
            ).eval()
    with torch.no_grad():
        forwards = measure_in_turns(
            {slots: (lambda m=module: m(x)) for slots, module in {None: ffn, **layers}.items()},
            s.repeat, s.device,
        )  # fmt: skip
    rows = [
        _row("FFN forward", None, forwards[None]),
        _row("FFN train step", None, train_step_timing(ffn, x, s)),
    ]
    for slots in _progress(list(layers), "layer train steps"):
        layer = layers.pop(slots)  # freed after its train step
        bound = product_lower_bound_s(layer.n_keys, s.queries, limits)
        rows += [
            _row("product forward", slots, forwards[slots]),
            _row("product train step", slots, train_step_timing(layer, x, s)),
            _row("lower bound", slots, Timing(bound, 0.0, 0)),
        ]
        del layer
        if slots <= 2**s.optimizer_max_exponent:
            rows += [
                _row("value step, Adam", slots, value_step_timing(slots, False, s)),
                _row("value step, SparseAdam", slots, value_step_timing(slots, True, s)),
            ]
    return rows


def layer_goals(rows: list[dict], meta: dict) -> list[Goal]:
    """Product forward at 2^20 vs 2^12 (<= 3x CPU, <= 2x GPU); CPU: within 4x of its bound."""
    gpu = meta["device_type"] == "cuda"
    big, small = (lookup(rows, "product forward", 2**e) for e in (20, 12))
    goals = [Goal("product layer 2^20 / 2^12 time", _ratio(big, small), 2 if gpu else 3, True)]
    if not gpu:
        bound_ratio = _ratio(big, lookup(rows, "lower bound", 2**20))
        goals.append(Goal("product layer 2^20 / lower bound", bound_ratio, 4, True))
    return goals


def layer_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["slots", "fwd ms", "train ms", "bound ms", "fwd/bound", "fwd/FFN fwd",
              "Adam ms", "SparseAdam ms", "Adam/Sparse"]  # fmt: skip
    ffn = lookup(rows, "FFN forward", None)
    lines = []  # means over the rounds (format_table), ratios within rounds
    for slots in sorted({row["slots"] for row in rows if row["slots"]}):
        forward, bound = lookup(rows, "product forward", slots), lookup(rows, "lower bound", slots)
        adam = lookup(rows, "value step, Adam", slots)
        sparse = lookup(rows, "value step, SparseAdam", slots)
        lines.append([slots, forward, lookup(rows, "product train step", slots), bound,
                      _ratio(forward, bound), _ratio(forward, ffn), adam, sparse,
                      _ratio(adam, sparse)])  # fmt: skip
    return header, lines


def plot_layer(rows: list[dict], meta: dict):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for case, style in (("product forward", "o-"), ("product train step", "s-"),
                        ("lower bound", "k:")):  # fmt: skip
        plot_case(left, rows, case, style)
    for case, color in (("FFN forward", "C2"), ("FFN train step", "C3")):
        left.axhline(lookup(rows, case, None).mean, color=color, ls="--", label=f"dense {case}")
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="memory slots N",
             ylabel=f"time per {meta['queries']} tokens (ms)",
             title="Product-key layer vs the FFN it replaces")  # fmt: skip
    left.legend(fontsize=8, title=_spread_title(rows), title_fontsize=7)
    for case, style in (("value step, Adam", "o-"), ("value step, SparseAdam", "s-")):
        plot_case(right, rows, case, style)
    right.set_xscale("log", base=2)
    right.set(yscale="log", xlabel="value table rows N", ylabel="time per step (ms)",
              title="Value optimizer step: dense vs sparse")  # fmt: skip
    right.legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    return fig


# --- model ---------------------------------------------------------------------------------------


def language_model(n_layer: int, memory: str | None = None, n_keys: int = 64) -> nn.Module:
    """The benchmark model: 4 heads, d_model 256, byte vocabulary; a memory in block 2 if asked."""
    from pkm_ref.model import LanguageModel, MemoryConfig, ModelConfig

    memory_config = MemoryConfig(kind=memory or "product", n_keys=n_keys, k_dim=K_DIM,
                                 heads=HEADS, knn=KNN, query_norm="batchnorm")  # fmt: skip
    config = ModelConfig(vocab_size=256, block_size=256, n_layer=n_layer, n_head=4,
                         d_model=D_MODEL, dropout=0.0, memory_layers=(2,) if memory else (),
                         memory=memory_config)  # fmt: skip
    return LanguageModel(config)


def inference_timing(model: nn.Module, s: Settings) -> Timing:
    """One eval forward over a (B, T) batch of random tokens, without grad."""
    model.eval()
    idx = torch.randint(256, s.model_batch, device=s.device)  # (B, T)
    with torch.no_grad():
        return measure(lambda: model(idx), s.repeat, s.device)


def bench_model(s: Settings, limits: dict) -> list[dict]:
    """Tokens/s vs memory size (flat and product keys); dense L vs 2L vs L + memory."""
    tokens = s.model_batch[0] * s.model_batch[1]
    rows = []

    def add(case: str, slots: int | None, n_layer: int, memory: str | None = None) -> None:
        with s.device:  # built in place, not initialised on the CPU and copied
            model = language_model(n_layer, memory, math.isqrt(slots) if slots else 64)
        timing = inference_timing(model, s)
        rows.append(_row(case, slots, timing, tokens_per_s=tokens / timing.median_s))

    for exponent in _progress(s.sizes, "model"):
        slots = 2**exponent
        add("product keys", slots, 4, "product")
        if exponent <= s.model_flat_max_exponent:
            add("flat keys", slots, 4, "flat")
    add("dense, 4 layers", None, 4)
    add("dense, 8 layers", None, 8)
    add("4 layers + product memory", 2 ** s.sizes[len(s.sizes) // 2], 4, "product")
    return rows


def model_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["model", "slots", "tokens/s", "vs dense 4 layers"]
    dense = lookup(rows, "dense, 4 layers", None, "tokens_per_s")
    lines = []
    for row in rows:
        speed = lookup(rows, row["case"], row["slots"], "tokens_per_s")
        lines.append([row["case"], row["slots"], speed, _ratio(speed, dense)])
    return header, lines


def _bar_label(row: dict) -> str:
    label = row["case"].replace(", ", "\n").replace(" + ", "\n+ ")
    return f"{label}\n(2^{row['slots'].bit_length() - 1} slots)" if row["slots"] else label


def plot_model(rows: list[dict], meta: dict):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(3, 2))
    for case, style in (("flat keys", "o-"), ("product keys", "D-")):
        plot_case(left, rows, case, style, column="tokens_per_s")
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="memory slots N",
             ylabel="inference speed (tokens/s)",
             title="Language model with one memory layer")  # fmt: skip
    left.legend(title=_spread_title(rows), title_fontsize=7)
    bars = [row for row in rows if row["case"].startswith(("dense", "4 layers +"))]
    speeds = [lookup(rows, row["case"], row["slots"], "tokens_per_s") for row in bars]
    right.bar([_bar_label(row) for row in bars], [e.mean for e in speeds],
              color=["C2", "C3", "C1"])  # fmt: skip
    errorbar(right, [_bar_label(row) for row in bars], speeds, "none", ecolor="black")
    right.set(ylabel="inference speed (tokens/s)", title="Depth vs memory")
    fig.suptitle(f"{meta['device']}, {meta['dtype']}, batch {meta['model_batch']}", fontsize=9)
    fig.tight_layout()
    return fig


# --- Running a bench -----------------------------------------------------------------------------

TITLES = {
    "retrieval": "Retrieval: flat vs product keys (search + value read)",
    "layer": "Product-key layer vs dense FFN; value optimizer steps",
    "model": "Language model inference speed vs memory size",
}


def _spread_title(rows: list[dict]) -> str:
    """What the error bars of a bench figure show."""
    rounds = max((row.get("rounds") or 1 for row in rows), default=1)
    return f"mean; bars: min-max of {rounds} rounds" if rounds > 1 else "one round"


def model_goals(rows: list[dict], meta: dict) -> list[Goal]:
    """The issue sets no model-level goal: the figure is the result."""
    return []


# name -> (measure(settings, limits) -> rows, goals, ratio table, figure)
BENCH_PARTS = {
    "retrieval": (bench_retrieval, retrieval_goals, retrieval_table, plot_retrieval),
    "layer": (bench_layer, layer_goals, layer_table, plot_layer),
    "model": (bench_model, model_goals, model_table, plot_model),
}


def run_bench(name: str, s: Settings) -> dict:
    """Measure ``s.rounds`` times, print the ratio table and goals, save results and figure;
    returns the results."""
    bench, goals_of, table, plot = BENCH_PARTS[name]
    torch.manual_seed(0)
    print(f"\n{TITLES[name]}: {figures.device_name(s.device)}, profile {s.profile}, "
          f"{s.rounds} rounds")  # fmt: skip
    rounds, probes = [], []
    for index in range(s.rounds):
        probes.append(machine_limits(s))  # the bound of each round uses that round's limits
        print(f"round {index + 1}/{s.rounds}: memory bandwidth "
              f"{probes[-1]['memory_bandwidth_GBps']:.1f} GB/s, sgemm "
              f"{probes[-1]['matmul_GFLOPps']:.0f} GFLOP/s")  # fmt: skip
        rounds.append(bench(s, probes[-1]))
    rows = combine_rounds(rounds)
    limits = {key: statistics.fmean(p[key] for p in probes) for key in probes[0]}
    meta = {
        "device": figures.device_name(s.device),
        "device_type": s.device.type,
        "dtype": str(DTYPE).removeprefix("torch."),
        "threads": s.threads,
        "queries": s.queries,
        "flat_queries": s.flat_queries,  # flat keys are timed on these and scaled to ``queries``
        "model_batch": list(s.model_batch),
        "repeat": s.repeat,
        "rounds": s.rounds,
        "setting": f"d_model {D_MODEL}, k_dim {K_DIM}, heads {HEADS}, knn {KNN}",
        **limits,  # the mean of the rounds' probes
    }
    goals = goals_of(rows, meta)
    print(format_table(*table(rows)))
    for goal in goals:
        print(goal.line())
    spread = (
        f"Cells: mean ± half-width of the 95 % Student-t interval over {s.rounds} independent "
        f"rounds (each the median of {s.repeat} timed runs after a warm-up); a goal is met only "
        "when its whole interval clears the target."
    )
    notes = "\n".join([spread, ""] + [goal.line() + "  " for goal in goals])
    path = figures.save_results(f"bench_{name}", rows, s.profile, s.device, TITLES[name], notes,
                                meta=meta)  # fmt: skip
    figures.save_figure(plot(rows, meta), f"bench_{name}", s.profile, s.device)
    print(f"saved {path} (+ .md, .png)")
    return {"meta": meta, "rows": rows, "goals": goals}


def format_table(header: list[str], lines: list[list]) -> str:
    """A fixed-width text table; floats to 3 significant digits, slots as powers of two."""

    def cell(value, column: str) -> str:
        if isinstance(value, stats.Estimate):  # the mean over the rounds
            value = value.mean
        if value is None:
            return "-"
        if column == "slots" and isinstance(value, int):
            return f"2^{value.bit_length() - 1}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [header] + [[cell(v, c) for v, c in zip(line, header, strict=True)] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(lines)


# --- Command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=(*BENCHES, "all"), help="which benchmark to run")
    add_profile_argument(parser)
    add_device_argument(parser)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, metavar="E",
        help="memory sizes as exponents: N = 2^E slots, E even (default: by profile)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per measurement in a round"
    )
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="independent repetitions of the whole bench, for the 95 %% intervals",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    profile = args.profile or current_profile()
    settings = default_settings(profile, profile_device(profile, args.device))
    if args.sizes:
        if any(e % 2 or not 6 <= e <= 30 for e in args.sizes):
            raise ValueError(f"--sizes must be even exponents in [6, 30], got {args.sizes}")
        settings = replace(settings, sizes=tuple(sorted(set(args.sizes))))
    for name in ("repeat", "rounds"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
            settings = replace(settings, **{name: value})
    return settings


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    figures.output_dir(settings.profile)  # fails now if the results cannot be saved, not after
    for name in BENCHES if args.bench == "all" else (args.bench,):
        run_bench(name, settings)
    return 0
