"""Run a method's stages in one process, resumably.

`<train_path>/config.json` is the frozen config of the run; `<train_path>/stages.json` lists
the finished stages. A new run refuses a folder that already holds one (nothing saved is
overwritten); `--resume` continues it with the same config; `--stop_after STAGE` ends the process after that
stage (to inspect a search before fine-tuning, or to time stages on their own). Wall-clock seconds
of every stage run go to `<train_path>/timings.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from codebase.config import Config, load_config
from codebase.context import RunContext
from codebase.methods import get_method, method_names
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger, setup_logging
from utils.memory import describe_resident, release_freed_memory
from utils.seed import set_seed

log = get_logger(__name__)


# Flags that may differ between the runs of one folder: run control, the folder's own path (a run
# moved or copied elsewhere resumes there), and memory knobs that do not change any result.
_RUN_CONTROL = ("resume", "stop_after", "train_path", "recompute", "search_cache_mb")


def _check_run_folder(cfg: Config) -> None:
    saved = os.path.join(cfg.train_path, "config.json")
    if not os.path.exists(saved):
        return
    if not cfg.resume:
        raise ConfigError(f"--train_path {cfg.train_path} already holds a run; pass --resume to continue it "
                          "or choose another --train_path")
    before = dataclasses.asdict(load_config(saved))
    now = dataclasses.asdict(cfg)
    for key in sorted(now):
        if key not in _RUN_CONTROL and before.get(key) != now[key]:
            raise ConfigError(f"--resume with a different --{key} ({now[key]!r}) than the saved run "
                              f"({before.get(key)!r}); resume with the original flags")


def run(cfg: Config) -> dict:
    """Run `cfg.method` end to end; returns the final results (results.json)."""
    if cfg.method not in method_names():
        raise ConfigError(f"unknown --method {cfg.method!r}; known: {', '.join(method_names())}")
    _check_run_folder(cfg)
    os.makedirs(cfg.train_path, exist_ok=True)
    setup_logging(os.path.join(cfg.train_path, "log.txt"))
    atomic_write_json(os.path.join(cfg.train_path, "config.json"), json.loads(cfg.to_json()))
    set_seed(cfg.seed)
    ctx = RunContext(cfg)
    method = get_method(cfg.method)(ctx)
    stages = method.stages()
    if cfg.stop_after is not None and cfg.stop_after not in [stage.name for stage in stages]:
        raise ConfigError(f"--stop_after {cfg.stop_after!r} is not a stage of --method {cfg.method} "
                          f"({', '.join(stage.name for stage in stages)})")
    done_file, timings_file = (os.path.join(cfg.train_path, name) for name in ("stages.json", "timings.json"))
    done = json.load(open(done_file)) if os.path.exists(done_file) else []
    timings = json.load(open(timings_file)) if os.path.exists(timings_file) else {}
    for stage in stages:
        if stage.name in done:
            log.info("stage %s: already done", stage.name)
        else:
            log.info("stage %s", stage.name)
            tic = time.perf_counter()
            stage.run()
            timings[stage.name] = time.perf_counter() - tic  # of the process that finished the stage
            atomic_write_json(timings_file, timings)
            done.append(stage.name)
            atomic_write_json(done_file, done)
            # The next stage starts from this one's live memory, not from its leftovers.
            release_freed_memory()
            log.info("stage %s done in %.1f s; %s", stage.name, timings[stage.name], describe_resident())
        if stage.name == cfg.stop_after:
            log.info("stopping after stage %s (--stop_after); --resume continues the run", stage.name)
            break
    results_file = os.path.join(cfg.train_path, "results.json")
    return json.load(open(results_file)) if os.path.exists(results_file) else {}
