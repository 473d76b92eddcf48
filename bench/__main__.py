"""``python -m bench`` (``make bench``): every benchmark in turn, then the plots.

    .venv/bin/python -m bench [--quick] [--timeout S] [--plots-only] [NAME ...]

Each ``bench/bench_NAME.py`` runs in its own process (``python -m bench.bench_NAME [--quick]``), one
after the other, so one benchmark's memory and threads never colour the next. A benchmark that exits
non-zero or overruns its time limit is recorded in ``bench/RESULTS.md`` and ``results.json`` as
``failed`` with the tail of its output; the rest still run. Then every figure in ``bench/results.json``
is drawn to ``bench/<figure id>.png`` (matplotlib, Agg backend). Exit status is 0 unless nothing ran:
benchmarks measure, they do not gate.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH_DIR, REPO, WORK_DIR, Report, load_results

# Run order: cheap and foundational first; unknown new bench_*.py files run after these, by name.
ORDER = ("faust", "router", "loader", "latency", "enrich", "incremental")
DEFAULT_TIMEOUT = {"quick": 600.0, "full": 1800.0}


def discover() -> list[str]:
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def run_bench(name: str, quick: bool, timeout: float) -> tuple[bool, str]:
    source = (BENCH_DIR / f"bench_{name}.py").read_text(errors="replace")
    smoke = quick and "--quick" in source  # a benchmark without --quick runs at its own size
    cmd = [sys.executable, "-m", f"bench.bench_{name}", *(["--quick"] if smoke else [])]
    log_path = WORK_DIR / f"bench_{name}.log"
    print(f"== bench {name}: {' '.join(cmd[1:])} (log: {log_path.relative_to(REPO)})", flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Its own session: the benchmark and the workers it started. SIGTERM first, so that it stops
            # the broker it may have started (that one runs in a session of its own), then SIGKILL.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    took = time.monotonic() - started
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
    if code == 0:
        print(f"   ok in {took:.0f}s", flush=True)
        return True, ""
    why = f"timed out after {timeout:.0f}s" if code is None else f"exited with code {code}"
    print(f"   FAILED ({why}) in {took:.0f}s; last lines:\n     " + "\n     ".join(tail), flush=True)
    return False, why + "\n" + "\n".join(tail)


def record_failure(name: str, quick: bool, why: str) -> None:
    report = Report(
        name, f"{name} (failed)", command=f".venv/bin/python -m bench.bench_{name}" + (" --quick" if quick else "")
    )
    previous = load_results()["benchmarks"].get(name)
    if previous:
        report.title = previous.get("title", report.title)
    report.status = "failed"
    report.notes.append(
        f"the benchmark did not finish: {why.splitlines()[0]}; full output in bench/_work/bench_{name}.log"
    )
    report.save("Last lines of its output:\n\n```\n" + "\n".join(why.splitlines()[1:]) + "\n```\n")


def draw(results_path: Path | None = None) -> list[Path]:
    """Draw every figure of results.json into bench/<id>.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_results(results_path) if results_path else load_results()
    written = []
    for name, entry in sorted(data["benchmarks"].items()):
        for fig_spec in entry.get("figures", []):
            try:
                path = _draw_one(plt, fig_spec, entry)
            except (KeyError, ValueError, TypeError) as exc:
                print(f"   figure {fig_spec.get('id')} of {name} not drawn: {exc}", flush=True)
                continue
            written.append(path)
    return written


def _draw_one(plt, spec: dict, entry: dict) -> Path:  # noqa: ANN001 - matplotlib.pyplot module
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    series = spec["series"]
    if spec["kind"] == "bar":
        cats = list(dict.fromkeys(x for s in series for x in s["x"]))
        width = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            pos = [cats.index(x) + (i - (len(series) - 1) / 2) * width for x in s["x"]]
            yerr = _yerr(s)
            bars = ax.bar(pos, s["y"], width, label=s.get("label"), yerr=yerr, capsize=3)
            ax.bar_label(bars, labels=[_short(v) for v in s["y"]], fontsize=8, padding=2)
        ax.set_xticks(range(len(cats)), [_wrap(c) for c in cats], fontsize=8)
    else:
        for s in series:
            ax.errorbar(s["x"], s["y"], yerr=_yerr(s), marker="o", capsize=3, label=s.get("label"))
        ax.set_xticks(sorted({x for s in series for x in s["x"]}))
        ax.set_ylim(bottom=0)
    if spec.get("log_y"):
        ax.set_yscale("log")
    ax.set_title(spec["title"], fontsize=10)
    ax.set_xlabel(spec.get("x_label", ""))
    ax.set_ylabel(spec.get("y_label", ""))
    if len(series) > 1 or spec["kind"] == "line":
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    m = entry.get("machine", {})
    fig.text(
        0.01,
        0.01,
        f"{entry.get('date', '')} · {m.get('cpu', '')}, {m.get('cores', '')} cores · commit {m.get('commit', '')}",
        fontsize=7,
        color="gray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = BENCH_DIR / f"{spec['id']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _yerr(s: dict) -> list[list[float]] | None:
    if "lo" not in s or "hi" not in s:
        return None
    return [
        [max(y - lo, 0) for y, lo in zip(s["y"], s["lo"], strict=True)],
        [max(hi - y, 0) for y, hi in zip(s["y"], s["hi"], strict=True)],
    ]


def _short(v: float) -> str:
    if v != v:
        return ""
    return f"{v / 1000:.1f}k" if abs(v) >= 1000 else f"{v:.3g}"


def _wrap(label: str, width: int = 18) -> str:
    words, lines, cur = label.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all bench/bench_*.py)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat")
    ap.add_argument("--timeout", type=float, help="seconds per benchmark (default 1800, quick 600)")
    ap.add_argument("--plots-only", action="store_true", help="only redraw the PNGs from results.json")
    args = ap.parse_args(argv)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    ran = 0
    if not args.plots_only:
        available = discover()
        names = args.names or available
        unknown = [n for n in names if n not in available]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
            return 2
        timeout = args.timeout or DEFAULT_TIMEOUT["quick" if args.quick else "full"]
        started = time.monotonic()
        failed = []
        for name in names:
            ok, why = run_bench(name, args.quick, timeout)
            ran += 1
            if not ok:
                failed.append(name)
                record_failure(name, args.quick, why)
        print(
            f"== {ran} benchmark(s) in {time.monotonic() - started:.0f}s"
            + (f"; failed: {', '.join(failed)}" if failed else ""),
            flush=True,
        )
    pngs = draw()
    print(f"== plots: {', '.join(str(p.relative_to(REPO)) for p in pngs) or 'none'}")
    print("== results: bench/RESULTS.md, bench/results.json")
    return 0 if ran or args.plots_only else 1


if __name__ == "__main__":
    raise SystemExit(main())
