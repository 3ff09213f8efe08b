"""What the real-data benchmark scripts share: the host line they report, and running one
toolkit script as a child process with its output appended to a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host() -> str:
    """`<CPU model>, AVX-512|AVX2, <n> CPUs` of this machine."""
    with open("/proc/cpuinfo") as f:
        text = f.read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {'AVX-512' if 'avx512f' in text else 'AVX2'}, {os.cpu_count()} CPUs"


def write_json(path: str, obj) -> None:
    """Write `obj` to `path` atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def run_child(argv: list, log_path: str) -> dict:
    """Run `python <argv>` from the repository root, output appended to `log_path`; `{"wall": s}`.
    A failure stops the benchmark with one line naming the log."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    tic = time.perf_counter()
    with open(log_path, "a") as log:
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"error: {' '.join(argv[:3])} ... exited with {code}; see {log_path}")
    return {"wall": time.perf_counter() - tic}


def run_all(saved: dict, path: str, jobs, key: str, run) -> None:
    """Run `run(seed, name)` for every `(seed, name)` of `jobs` not yet in `saved["runs"]` (matched on
    `entry["seed"]` and `entry[key]`), appending each result and rewriting `path` atomically after
    each: an interrupted benchmark continues where it stopped."""
    for seed, name in jobs:
        if any(e[key] == name and e["seed"] == seed for e in saved["runs"]):
            continue
        print(f"{time.strftime('%H:%M:%S')} {name} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
        saved["runs"].append(run(seed, name))
        with open(path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(path + ".tmp", path)
