"""Run a method's stages in one process, resumably.

`<train_path>/config.json` is the frozen config of the run; `<train_path>/stages.json` lists
the finished stages. A new run refuses a folder that already holds one (nothing saved is
overwritten); `--resume` continues it with the same config.
"""

from __future__ import annotations

import dataclasses
import json
import os

from codebase.config import Config, load_config
from codebase.context import RunContext
from codebase.methods import get_method, method_names
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger, setup_logging
from utils.seed import set_seed

log = get_logger(__name__)


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
        if key != "resume" and before.get(key) != now[key]:
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
    done_file = os.path.join(cfg.train_path, "stages.json")
    done = json.load(open(done_file)) if os.path.exists(done_file) else []
    for stage in method.stages():
        if stage.name in done:
            log.info("stage %s: already done", stage.name)
            continue
        log.info("stage %s", stage.name)
        stage.run()
        done.append(stage.name)
        atomic_write_json(done_file, done)
    results_file = os.path.join(cfg.train_path, "results.json")
    return json.load(open(results_file)) if os.path.exists(results_file) else {}
