"""proclock side by side with raw flock(2) and the peers, in one run, as ratios.

    python bench/run.py            # the full run (a few minutes)
    python bench/run.py --quick    # the CI smoke test (well under a minute; asserts nothing)

Every figure is a median over interleaved rounds: this machine is shared and noisy, so absolute
times drift, but ratios measured in one run hold. Results go to bench/results/last.json; the
previous file is compared against and kept as bench/results/previous.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SPAWN = multiprocessing.get_context("spawn")
sys.path.insert(0, str(HERE))

import impls  # noqa: E402


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n## {title}\n")
    cells = [[str(c) for c in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # noqa: PLR0124  (NaN)
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}"
    return str(v)


# -- 1. uncontended round trip ----------------------------------------------------------------


def uncontended(d: str, quick: bool) -> dict[str, float]:
    names = impls.available_round_trip()
    ops = 2_000 if quick else 20_000
    rounds = 3 if quick else 9
    makers = {n: impls.round_trip(n, d) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:  # interleaved: every impl sees the same machine state
            op = makers[n]
            op()
            t = time.perf_counter_ns()
            for _ in range(ops):
                op()
            samples[n].append((time.perf_counter_ns() - t) / ops / 1000)
    result = {n: median(s) for n, s in samples.items()}
    raw = result["raw"]
    table(
        f"1. Uncontended round trip (µs per acquire+release, median of {rounds} rounds x {ops})",
        ["lock", "µs/op", "× raw"],
        [[n, v, v / raw] for n, v in result.items()],
    )
    return result


# -- 2. handoff latency ---------------------------------------------------------------------


def handoff(d: str, quick: bool) -> dict[str, dict[str, float]]:
    names = impls.available_handoff()
    out: dict[str, dict[str, float]] = {}
    rows = []
    for n in names:
        polling = impls.POLLS.get(n, False)
        count = (5 if polling else 40) if quick else (30 if polling else 400)
        lat = impls.run_handoffs(n, d, count)
        stats = {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99), "n": len(lat)}
        out[n] = stats
    raw = out["raw"]["p50"]
    for n, s in out.items():
        rows.append([n, s["p50"], s["p90"], s["p99"], s["p50"] / raw, int(s["n"])])
    table(
        "2. Handoff latency (µs from the holder's release to the waiter's return)",
        ["lock", "p50", "p90", "p99", "p50 × raw", "handoffs"],
        rows,
    )
    return out


# -- 3. contended throughput and fairness ---------------------------------------------------


def throughput(d: str, quick: bool) -> dict[str, dict[str, Any]]:
    names = impls.available_throughput()
    seconds = 0.3 if quick else 2.0
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for nproc in (2, 4, 8):
        for n in names:
            r = impls.run_counter(n, d, nproc, seconds)
            out[f"{n}@{nproc}"] = r
        raw = out[f"raw@{nproc}"]["ops_per_s"]
        for n in names:
            r = out[f"{n}@{nproc}"]
            rows.append(
                [
                    f"N={nproc} {n}",
                    r["ops_per_s"],
                    r["ops_per_s"] / raw,
                    r["fairness"],
                    r["max_wait_ms"],
                    r["lost"],
                ]
            )
    table(
        f"3. Contended throughput ({seconds:g} s per row, counter in a file under the lock)",
        ["processes / lock", "ops/s", "× raw", "fewest/most", "longest wait ms", "lost updates"],
        rows,
    )
    return out


# -- 4. start-up ----------------------------------------------------------------------------

SINGLETON_SCRIPT = """
from proclock import singleton_process

@singleton_process
def main():
    pass

main()
"""


def startup(quick: bool) -> dict[str, float]:
    runs = 5 if quick else 21
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "single.py")
        script.write_text(SINGLETON_SCRIPT)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import proclock": [sys.executable, "-c", "import proclock"],
            "import proclock; ProcessLock round trip": [
                sys.executable,
                "-c",
                "import proclock; proclock.ProcessLock('startup-bench').acquire().release()",
            ],
            "import wrapt": [sys.executable, "-c", "import wrapt"],
            "@singleton_process script": [sys.executable, str(script)],
            # The command line's start-up (issue 11): argparse, the parser, one lock path.
            "proclock path x": [_console_script(), "path", "x"],
            "python -m proclock path x": [sys.executable, "-m", "proclock", "path", "x"],
        }
        env = dict(os.environ, PROCLOCK_DIR=tmp)
        # As users run it: with bytecode caches (a session may set PYTHONDONTWRITEBYTECODE,
        # which makes every import compile its module from source). One warm-up run each
        # writes the caches.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for cmd in cases.values():
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        samples: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for k, cmd in cases.items():
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                samples[k].append((time.perf_counter() - t) * 1000)
    result = {k: median(v) for k, v in samples.items()}
    base = result["python -c pass"]
    table(
        f"4. Start-up (ms wall time, median of {runs})",
        ["command", "ms", "+ms over python -c pass", "× python -c pass"],
        [[k, v, v - base, v / base] for k, v in result.items()],
    )
    return result


def _console_script() -> str:
    """The `proclock` script installed next to this interpreter (else the one on PATH)."""
    script = Path(sys.executable).parent / "proclock"
    if os.access(script, os.X_OK):
        return str(script)
    import shutil

    found = shutil.which("proclock")
    if found is None:
        raise SystemExit("bench: no `proclock` console script (pip install -e .)")
    return found


# -- 5. steady state ------------------------------------------------------------------------


def steady(d: str, quick: bool) -> dict[str, Any]:
    ok = 100_000 if quick else 1_000_000
    timed_out = 500 if quick else 10_000
    r = impls.run_steady(d, ok, timed_out)
    table(
        "5. Steady state (one process: fds and RSS before and after)",
        ["phase", "fds", "RSS KiB", "threads"],
        [
            ["after warm-up", r["fd0"], r["rss0"], r["threads0"]],
            [f"after {ok:,} uncontended acquisitions", r["fd1"], r["rss1"], r["threads1"]],
            ["holder started, 10 timed-out (warm-up)", r["fdw"], r["rssw"], r["threadsw"]],
            [f"after {timed_out:,} timed-out acquisitions", r["fd2"], r["rss2"], r["threads2"]],
        ],
    )
    return r


def compare(current: dict[str, Any], previous: dict[str, Any]) -> None:
    cur, prev = current.get("uncontended", {}), previous.get("uncontended", {})
    if not cur or not prev or "raw" not in prev:
        return
    rows = []
    for n, v in cur.items():
        if n in prev:
            rows.append([n, prev[n] / prev["raw"], v / cur["raw"]])
    table("Compared with the previous run (uncontended, × raw)", ["lock", "before", "now"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument(
        "--only", choices=["uncontended", "handoff", "throughput", "startup", "steady"]
    )
    args = parser.parse_args()
    print(
        f"# proclock bench: Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"{'quick' if args.quick else 'full'} run, peers: {impls.peer_versions()}"
    )
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "quick": args.quick,
        "peers": impls.peer_versions(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    steps = {
        "uncontended": lambda d: uncontended(d, args.quick),
        "handoff": lambda d: handoff(d, args.quick),
        "throughput": lambda d: throughput(d, args.quick),
        "startup": lambda _d: startup(args.quick),
        "steady": lambda d: steady(d, args.quick),
    }
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o700)
        os.environ["PROCLOCK_DIR"] = d
        for name, step in steps.items():
            if args.only in (None, name):
                results[name] = step(d)
    RESULTS.mkdir(exist_ok=True)
    # One file per kind of run, so that a partial run is compared only with its own kind.
    stem = "last" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    last = RESULTS / f"{stem}.json"
    if last.exists():
        with contextlib.suppress(ValueError):
            compare(results, json.loads(last.read_text()))
        last.replace(last.with_name(last.stem + "-previous.json"))
    last.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfigures written to {last.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    fcntl.flock  # noqa: B018  (fail early on a platform without flock)
    sys.exit(main())
