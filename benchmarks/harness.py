"""Common harness of the benchmarks: arms, seeds, timing figures, results JSON/Markdown/PNG.

Every benchmark is a thin script (see ``benchmarks/baseline.py``)::

    args = harness.parser("baseline", "Plain SGD on the MNIST subset").parse_args(argv)
    runs = harness.interleave({"baseline": run_baseline, "method": run_method}, seeds)
    harness.write_results("baseline", args=args, config=..., runs=runs, summary=...,
                          claim_md=..., table_md=..., plot=harness.plot_curves(runs))

Baseline and method arms run in the same process on the same seeds, seed-major (seed 0 of
every arm, then seed 1, ...), so a drift in the machine's speed hits every arm alike. Results go
to ``<out_dir>/<name>.{json,md,png}`` (``<name>.quick.*`` with ``--quick``, never over the full
results), each written to a temporary file and renamed, so a failing run leaves what was there.
The JSON holds ``benchmark, command, date, quick, machine, versions, config, runs, summary``;
``summary`` is a flat mapping of named figures (see :func:`write_results`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_OUT_DIR",
    "parser",
    "seeds_from_args",
    "epochs_from_args",
    "start",
    "interleave",
    "time_to_accuracy",
    "paired_ci",
    "paired_ratio",
    "mean_std",
    "median_ms",
    "machine_info",
    "versions",
    "command_line",
    "result_paths",
    "plot_curves",
    "write_results",
    "write_text",
    "ci_keys",
    "number",
    "delta_text",
    "setup_logging",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = "benchmarks/results"

Run = dict[str, Any]


def setup_logging(level: int = logging.INFO) -> None:
    """Sends log records to stderr (what a benchmark's ``main`` calls first)."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The common argument parser of a benchmark.

    Flags: ``--quick`` (a smoke run of seconds; results go to ``<name>.quick.*``), ``--seeds N``
    (seeds ``0..N-1``), ``--epochs N``, ``--out-dir DIR`` (default ``benchmarks/results``).
    ``--seeds`` and ``--epochs`` default to None: the benchmark picks its own defaults (full or
    quick). A benchmark may add flags of its own.

    Args:
      name: the benchmark's name (``python -m benchmarks.<name>``).
      description: one line for ``--help``.

    Returns:
      An ``argparse.ArgumentParser``.

    Examples:
      >>> a = parser("baseline", "demo").parse_args(["--quick", "--seeds", "2"])
      >>> print(a.quick, a.seeds, a.epochs, a.out_dir)
      True 2 None benchmarks/results
    """
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="smoke run (seconds); writes *.quick.*")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where results are written")
    p.set_defaults(benchmark=name)
    return p


def seeds_from_args(args: argparse.Namespace, full: int, quick: int = 1) -> list[int]:
    """Seeds ``0..n-1``, ``n`` from ``--seeds`` or the full/quick default.

    Raises:
      ValueError: for ``--seeds`` < 1.
    """
    n = args.seeds if args.seeds is not None else (quick if args.quick else full)
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n!r}")
    return list(range(n))


def epochs_from_args(args: argparse.Namespace, full: int, quick: int = 1) -> int:
    """Epochs from ``--epochs`` or the full/quick default.

    Raises:
      ValueError: for ``--epochs`` < 1.

    Examples:
      >>> a = parser("demo", "demo").parse_args(["--quick"])
      >>> epochs_from_args(a, full=10), epochs_from_args(a, full=10, quick=2)
      (1, 2)
    """
    n = args.epochs if args.epochs is not None else (quick if args.quick else full)
    if n < 1:
        raise ValueError(f"--epochs must be >= 1, got {n!r}")
    return n


def start(
    name: str,
    doc: str | None,
    argv: Sequence[str] | None,
    *,
    full_seeds: int,
    quick_seeds: int = 1,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, list[int]]:
    """The prologue of every benchmark's ``main``: logging, the command line, the seeds.

    Args:
      name: the benchmark's name (``python -m benchmarks.<name>``).
      doc: the module docstring; its first line is the ``--help`` description.
      argv: command-line arguments (None: ``sys.argv[1:]``).
      full_seeds: seeds of a full run (``--seeds`` overrides).
      quick_seeds: seeds of a ``--quick`` run.
      add_flags: adds the benchmark's own flags to the common parser.

    Returns:
      ``(args, seeds)``; a ``--epochs`` below 1 is refused here.

    Raises:
      ValueError: for ``--seeds`` or ``--epochs`` below 1.

    Examples:
      >>> args, seeds = start("demo", "Demo.", ["--seeds", "2"], full_seeds=5)
      >>> print(args.quick, seeds)
      False [0, 1]
    """
    setup_logging()
    p = parser(name, (doc or name).strip().splitlines()[0])
    if add_flags is not None:
        add_flags(p)
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs!r}")
    return args, seeds_from_args(args, full=full_seeds, quick=quick_seeds)


def interleave(
    arms: Mapping[str, Callable[[int], Mapping[str, Any]]], seeds: Iterable[int]
) -> list[Run]:
    """Runs every arm on every seed, seed-major: seed 0 of each arm, then seed 1, ...

    Args:
      arms: ``{arm name: run(seed) -> dict of figures}``, called in the mapping's order.
      seeds: the seeds.

    Returns:
      One dict per run: ``{"arm": name, "seed": seed, **run(seed)}``.

    Examples:
      >>> arms = {"a": lambda s: {"x": s}, "b": lambda s: {"x": 10 * s}}
      >>> [(r["arm"], r["seed"], r["x"]) for r in interleave(arms, [0, 1])]
      [('a', 0, 0), ('b', 0, 0), ('a', 1, 1), ('b', 1, 10)]
    """
    runs = []
    for seed in seeds:
        for arm, fn in arms.items():
            logger.info("run: arm %s, seed %d", arm, seed)
            out = dict(fn(seed))
            runs.append({"arm": arm, "seed": seed, **out})
    return runs


def time_to_accuracy(
    history: Sequence[Mapping[str, float]], target: float, *, key: str = "test_accuracy"
) -> float | None:
    """Train time (``train_time_s``) of the first epoch whose accuracy reaches ``target``.

    Args:
      history: per-epoch dicts with ``train_time_s`` (cumulative) and ``key``.
      target: accuracy to reach (``>=``).
      key: which accuracy to read.

    Returns:
      Seconds, or None if never reached.

    Examples:
      >>> h = [{"train_time_s": 1.0, "test_accuracy": 0.5},
      ...      {"train_time_s": 2.0, "test_accuracy": 0.9}]
      >>> time_to_accuracy(h, 0.8), time_to_accuracy(h, 0.95)
      (2.0, None)
    """
    for row in history:
        if row[key] >= target:
            return float(row["train_time_s"])
    return None


def paired_ci(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of the paired differences ``b - a`` and its t confidence interval.

    Args:
      a: figures of the first arm, one per seed.
      b: figures of the second arm, same seeds in the same order.
      confidence: the interval's confidence level.

    Returns:
      ``(mean, low, high)``; with one pair the interval is ``(nan, nan)``.

    Raises:
      ValueError: if ``a`` and ``b`` differ in length or are empty.

    Examples:
      >>> m, lo, hi = paired_ci([1.0, 2.0, 3.0], [2.0, 3.0, 5.0])
      >>> print(f"{m:.3f} {lo:.3f} {hi:.3f}")
      1.333 -0.101 2.768
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be non-empty and paired, got {len(a)} and {len(b)}")
    d = [float(y) - float(x) for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    sem = statistics.stdev(d) / math.sqrt(len(d))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sem
    return mean, mean - half, mean + half


def paired_ratio(
    num: Sequence[float], den: Sequence[float], *, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Median of the paired ratios ``num[i] / den[i]`` and its distribution-free interval.

    For timings taken in rounds (every program once per round, in a shuffled order), the
    per-round ratio cancels drift in the machine's speed that a ratio of two medians keeps.
    The interval is the order-statistic confidence interval of the median
    (``scipy.stats.quantile_test``); it is nan for fewer than 6 pairs.

    Args:
      num: figures of the numerator arm, one per round.
      den: figures of the denominator arm, same rounds in the same order. Pairs where either
        is nan (an arm not timed in that round) are left out.
      confidence: the interval's confidence level.

    Returns:
      ``(median, low, high)``.

    Raises:
      ValueError: if ``num`` and ``den`` differ in length or no pair is left.

    Examples:
      >>> m, lo, hi = paired_ratio([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0])
      >>> print(m, lo, hi)
      2.0 nan nan
    """
    if len(num) != len(den):
        raise ValueError(f"num and den must be paired, got {len(num)} and {len(den)} figures")
    r = [
        float(a) / float(b)
        for a, b in zip(num, den)
        if not (math.isnan(float(a)) or math.isnan(float(b)))
    ]
    if not r:
        raise ValueError("paired_ratio: no pair with both figures present")
    med = float(statistics.median(r))
    if len(r) < 6:
        return med, math.nan, math.nan
    from scipy import stats

    ci = stats.quantile_test(r, p=0.5).confidence_interval(confidence_level=confidence)
    return med, float(ci.low), float(ci.high)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Examples:
      >>> mean_std([1.0, 2.0, 3.0])
      (2.0, 1.0)
    """
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def median_ms(times: Iterable[float]) -> float:
    """Median of a list of step times (nan if empty).

    Examples:
      >>> median_ms([3.0, 1.0, 2.0, 10.0])
      2.5
    """
    times = list(times)
    return float(statistics.median(times)) if times else math.nan


def machine_info() -> dict[str, Any]:
    """Device, core count, platform, processor and current load of this machine."""
    import jax

    devices = jax.devices()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "cores": cores,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        # 1-, 5- and 15-minute load averages when the results were written: a load well above
        # the core count means other work shared the machine and absolute times are inflated
        # (ratios of interleaved arms much less so)
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def git_commit(root: str | os.PathLike[str] | None = None) -> str:
    """The checkout's commit, ``+dirty`` if tracked code differs from it, or ``"unknown"``.

    Results files (``benchmarks/results``) and prose (``docs/*.md``, ``README.md``) do not
    count as dirty: a run writes the first, and editing the second between the runs of a batch
    changes no figure. ``docs/conf.py`` and anything else still counts.

    Args:
        root: The checkout; defaults to the one this module is in.
    """
    root = pathlib.Path(__file__).resolve().parents[1] if root is None else pathlib.Path(root)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown"
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benchmarks/results", ":(exclude)docs/*.md",
                     ":(exclude)README.md")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def versions() -> dict[str, str]:
    """Versions of jax, jaxlib, optax, flax, numpy and optax_multirate, and the git commit."""
    out = {}
    for dist in ("jax", "jaxlib", "optax", "flax", "numpy", "optax-multirate"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    out["git_commit"] = git_commit()
    return out


def command_line(argv: Sequence[str] | None = None, name: str | None = None) -> str:
    """The command that reruns this benchmark, e.g. ``python -m benchmarks.baseline --seeds 3``.

    Args:
      argv: the arguments given to ``main`` (default: ``sys.argv[1:]``).
      name: the benchmark module's short name (default: from ``sys.argv[0]``).

    Examples:
      >>> command_line(["--seeds", "3"], "baseline")
      'python -m benchmarks.baseline --seeds 3'
    """
    if argv is None:
        argv = sys.argv[1:]
    if name is None:
        name = pathlib.Path(sys.argv[0]).stem
    return " ".join(["python", "-m", f"benchmarks.{name}", *(shlex.quote(a) for a in argv)])


def result_paths(
    name: str, out_dir: str | os.PathLike[str], quick: bool
) -> dict[str, pathlib.Path]:
    """``{"json", "md", "png"}`` paths of a benchmark's results (``<name>.quick.*`` if quick).

    Examples:
      >>> sorted(p.name for p in result_paths("baseline", "r", True).values())
      ['baseline.quick.json', 'baseline.quick.md', 'baseline.quick.png']
    """
    stem = f"{name}.quick" if quick else name
    out = pathlib.Path(out_dir)
    return {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def plot_curves(
    runs: Sequence[Mapping[str, Any]],
    *,
    x: str = "train_time_s",
    y: str = "test_accuracy",
    title: str | None = None,
    xlabel: str = "train time (s, compile excluded)",
    ylabel: str = "test accuracy",
) -> Callable[[Any], None]:
    """A plot callable for :func:`write_results`: one line per run, ``y`` against ``x``.

    Each run must carry ``history`` (per-epoch dicts, as ``FitResult.history``); lines of one
    arm share a colour.

    Returns:
      ``plot(fig) -> None`` drawing on a matplotlib figure.
    """

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        arms = list(dict.fromkeys(r["arm"] for r in runs))
        colours = {a: f"C{i}" for i, a in enumerate(arms)}
        labelled: set[str] = set()
        for r in runs:
            hist = r.get("history") or []
            xs = [h[x] for h in hist]
            ys = [h[y] for h in hist]
            lab = r["arm"] if r["arm"] not in labelled else None
            labelled.add(r["arm"])
            ax.plot(xs, ys, marker="o", ms=3, color=colours[r["arm"]], label=lab, alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()

    return plot


def ci_keys(key: str) -> tuple[str, str]:
    """The interval's keys of a delta key: ``x_pt`` -> ``(x_ci_low_pt, x_ci_high_pt)``.

    Raises:
      ValueError: if ``key`` does not end in ``_pt``.

    Examples:
      >>> ci_keys("k5_accuracy_delta_pt")
      ('k5_accuracy_delta_ci_low_pt', 'k5_accuracy_delta_ci_high_pt')
    """
    if not (isinstance(key, str) and key.endswith("_pt")):
        raise ValueError(f"key must be a delta key ending in '_pt', got {key!r}")
    return f"{key[:-3]}_ci_low_pt", f"{key[:-3]}_ci_high_pt"


def number(x: Any, spec: str = "+.2f") -> str:
    """``x`` formatted with ``spec`` for a results table, ``n/a`` for None, nan or inf.

    Examples:
      >>> number(-0.7481), number(None), number(float("nan"), ".3f")
      ('-0.75', 'n/a', 'n/a')
    """
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def delta_text(summary: Mapping[str, Any], key: str, spec: str = "+.2f") -> str:
    """A delta and its interval for a results table: ``"mean [low, high]"`` (:func:`ci_keys`).

    Examples:
      >>> s = {"d_pt": -0.68, "d_ci_low_pt": -1.84, "d_ci_high_pt": None}
      >>> delta_text(s, "d_pt")
      '-0.68 [-1.84, n/a]'
    """
    low, high = (number(summary[k], spec) for k in ci_keys(key))
    return f"{number(summary[key], spec)} [{low}, {high}]"


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Writes through ``write(tmp_path)`` to a temp file beside ``path``; returns the temp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; results are for everyone
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


def write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    """Writes ``text`` to ``path`` through a temp file renamed into place (a failed write
    leaves the old file); returns ``path``."""
    os.replace(_atomic_write(path, lambda p: p.write_text(text)), path)
    logger.info("wrote %s", path)
    return path


def _json_default(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)!r}")


def _clean(x: Any) -> Any:
    """NaN and inf become None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_results(
    name: str,
    *,
    args: argparse.Namespace,
    config: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    summary: Mapping[str, float | int | bool | None],
    claim_md: str,
    table_md: str,
    plot: Callable[[Any], None] | None = None,
    argv: Sequence[str] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, pathlib.Path]:
    """Writes ``<out_dir>/<name>.{json,md,png}`` (``<name>.quick.*`` under ``--quick``).

    All files are rendered to temporary files first and renamed into place only when every
    one succeeded, so a failing run (or plot) leaves existing results untouched.

    Args:
      name: the benchmark's name.
      args: parsed arguments (``quick``, ``out_dir``, ...) from :func:`parser`.
      config: model, data set, epochs, batch size, seeds, hyperparameters.
      runs: one dict per run (``arm``, ``seed``, figures, optionally ``history``).
      summary: flat mapping of named figures (numbers, booleans or None). Key names say the
        unit: accuracies are fractions in [0, 1] unless the key ends in ``_pt`` (percentage
        points); times end in ``_s`` or ``_ms``, ratios in ``_ratio``; a standard deviation
        appends ``_std``; a difference "a vs b" is a minus b.
      claim_md: the paper's claim, Markdown.
      table_md: our results table, Markdown.
      plot: ``plot(fig)`` drawing on a matplotlib figure (e.g. :func:`plot_curves`), or None
        for no PNG.
      argv: the arguments of the run, for the recorded command (default ``sys.argv[1:]``).
      selection: ``{arm: selection record}`` of a benchmark that compares arms
        (``benchmarks.protocol.select``), written at the top level as ``"selection"``.

    Returns:
      ``{"json", "md"[, "png"]}`` paths written.

    Raises:
      ValueError: if ``summary`` is not flat (numbers, booleans or None).
    """
    for k, v in summary.items():
        if not (v is None or isinstance(v, (bool, int, float))):
            raise ValueError(f"summary[{k!r}] must be a number, bool or None, got {v!r}")
    quick = bool(getattr(args, "quick", False))
    paths = result_paths(name, getattr(args, "out_dir", DEFAULT_OUT_DIR), quick)
    command = command_line(argv, name)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = machine_info()
    record = {
        "benchmark": name,
        "command": command,
        "date": date,
        "quick": quick,
        "machine": machine,
        "versions": versions(),
        "config": dict(config),
        **({} if selection is None else {"selection": dict(selection)}),
        "runs": [dict(r) for r in runs],
        "summary": dict(summary),
    }
    text = json.dumps(_clean(record), indent=2, default=_json_default) + "\n"
    cores = machine["cores"]
    md = "\n".join(
        [
            f"<!-- written by `{command}`; do not edit by hand -->",
            "",
            f"Command: `{command}`{' (quick smoke run)' if quick else ''}  ",
            f"Date: {date}  ",
            f"Machine: {machine['device']} ({machine['device_kind']}), {cores} cores, "
            f"{machine['platform']}  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
            "",
            "**Paper's claim.** " + claim_md.strip(),
            "",
            "**Ours.**",
            "",
            table_md.strip(),
            "",
        ]
    )
    temps: dict[str, pathlib.Path] = {}
    try:
        temps["json"] = _atomic_write(paths["json"], lambda p: p.write_text(text))
        temps["md"] = _atomic_write(paths["md"], lambda p: p.write_text(md))
        if plot is not None:
            temps["png"] = _atomic_write(paths["png"], lambda p: _render(plot, p))
    except BaseException:
        for t in temps.values():
            t.unlink(missing_ok=True)
        raise
    for ext, tmp in temps.items():
        os.replace(tmp, paths[ext])
        logger.info("wrote %s", paths[ext])
    return {ext: paths[ext] for ext in temps}


def _render(plot: Callable[[Any], None], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas; no pyplot, no global backend

    fig = Figure(figsize=(7, 4.5))
    plot(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
