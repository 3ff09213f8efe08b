"""Run a chain of methods, step by step and stage by stage, in one process, resumably.

`<train_path>/config.json` is the frozen config of the run; each step works in its own folder
`<train_path>/<i>-<method>/` (the baseline, when the run trains one, in `0-baseline/`), starting
from the previous step's output net (`trained_params.pkl` + spec + transform state) and writing
its own. `<train_path>/stages.json` lists the finished stages (`1-ekg/search`, ...).

A new run refuses a folder that already holds one (nothing saved is overwritten); `--resume`
continues it with the same config at the first unfinished stage, and a training stage at its
last checkpoint; `--stop_after STAGE` ends the process after that stage (`search` or
`1-ekg/search`: to inspect a search before fine-tuning, or to time stages on their own).
Wall-clock seconds of every stage go to `<train_path>/timings.json`. When the last step is
done, `<train_path>/results.json` summarises every step (the last step's results at the top
level, each step's under `steps`) and `<train_path>/trained_params.pkl` is the final net.
"""

from __future__ import annotations

import json
import os
import time

from codebase import stages
from codebase.artifacts import copy_net_files
from codebase.config import Config, load_config
from codebase.context import OUTPUT, RunContext, StepContext
from codebase.methods import Stage, get_method
from codebase.stages import RESULTS
from op_utils.strategy import resolve_xla
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger, setup_logging
from utils.memory import describe_resident, release_freed_memory
from utils.seed import set_seed

log = get_logger(__name__)


def _check_run_folder(cfg: Config) -> None:
    saved = os.path.join(cfg.run.train_path, "config.json")
    if not os.path.exists(saved):
        return
    if not cfg.run.resume:
        raise ConfigError(f"--train_path {cfg.run.train_path} already holds a run; pass --resume to continue it "
                          "or choose another --train_path")
    before, now = load_config(saved).comparable(), cfg.comparable()
    if len(before["steps"]) != len(now["steps"]) or before["run"].get("method") != now["run"].get("method"):
        raise ConfigError(f"--resume with --method {cfg.run.method} but the saved run has --method "
                          f"{before['run'].get('method')}; resume with the original flags")
    for key in sorted(now["run"]):
        if before["run"].get(key) != now["run"][key]:
            raise ConfigError(f"--resume with a different --{key} ({now['run'][key]!r}) than the saved run "
                              f"({before['run'].get(key)!r}); resume with the original flags")
    for old, new in zip(before["steps"], now["steps"]):
        for part in ("options", "optim"):
            for key in sorted(new[part]):
                if old[part].get(key) != new[part][key]:
                    raise ConfigError(f"--resume with a different --{key} ({new[part][key]!r}) than the saved run "
                                      f"({old[part].get(key)!r}) in step {new['name']}; resume with the original "
                                      "flags")


def _load(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def plan(cfg: Config, ctx: RunContext) -> list:
    """`[(StepContext, method)]` of the run, each step's input the previous step's output."""
    out, source = [], cfg.run.trained_param
    origin = source
    for index, step in enumerate(cfg.steps):
        cls = get_method(step.method)
        following = cfg.steps[index + 1] if index + 1 < len(cfg.steps) else None
        next_trains = following is not None and get_method(following.method).trains
        context = StepContext(ctx, step, index, source, origin, next_trains)
        method = cls(context)
        if following is None and cfg.run.export:
            method = _Exporting(method, cfg.run.export)
        out.append((context, method))
        source = context.output
        if step.name == "0-baseline":
            origin = source
    return out


class _Exporting:
    """The last step's method with an `export` stage after its own (`--export`)."""

    def __init__(self, method, formats):
        self.method, self.formats = method, tuple(formats)

    def stages(self):
        return [*self.method.stages(), Stage("export", lambda: stages.export(self.method.step, self.formats))]


def run(cfg: Config) -> dict:
    """Run the chain of `cfg` end to end; returns the final results (results.json)."""
    _check_run_folder(cfg)
    run_cfg = cfg.run
    os.makedirs(run_cfg.train_path, exist_ok=True)
    setup_logging(os.path.join(run_cfg.train_path, "log.txt"))
    # Seeded always; op-deterministic unless XLA compiles the step: XLA has no deterministic
    # max-pool gradient and, under op determinism, refuses to compile one (LeNet-5, VGG-16, the
    # ImageNet ResNets).
    set_seed(run_cfg.seed, deterministic=not resolve_xla(run_cfg.compile))
    ctx = RunContext(cfg)
    log.info("devices: %s", "; ".join(ctx.devices))
    steps = plan(cfg, ctx)
    names = [(step.step.name, stage.name) for step, method in steps for stage in method.stages()]
    log.info("plan: %s", ", ".join(f"{s}/{t}" for s, t in names))
    if run_cfg.stop_after is not None and run_cfg.stop_after not in {t for _, t in names} | {f"{s}/{t}"
                                                                                          for s, t in names}:
        raise ConfigError(f"--stop_after {run_cfg.stop_after!r} is not a stage of --method {run_cfg.method} "
                          f"({', '.join(f'{s}/{t}' for s, t in names)})")
    # Written once the data and the plan are known to work: a run that fails before this (a wrong
    # --data_path) leaves a folder the corrected command may use.
    atomic_write_json(os.path.join(run_cfg.train_path, "config.json"), cfg.to_dict())
    done_file, timings_file = (os.path.join(run_cfg.train_path, n) for n in ("stages.json", "timings.json"))
    done, timings = _load(done_file, []), _load(timings_file, {})
    for step, method in steps:
        for stage in method.stages():
            name = f"{step.step.name}/{stage.name}"
            if name in done:
                log.info("stage %s: already done", name)
            else:
                log.info("stage %s", name)
                tic = time.perf_counter()
                stage.run()
                timings[name] = time.perf_counter() - tic  # of the process that finished the stage
                atomic_write_json(timings_file, timings)
                done.append(name)
                atomic_write_json(done_file, done)
                # The next stage starts from this one's live memory, not from its leftovers.
                release_freed_memory()
                log.info("stage %s done in %.1f s; %s", name, timings[name], describe_resident())
            if run_cfg.stop_after in (stage.name, name):
                log.info("stopping after stage %s (--stop_after); --resume continues the run", name)
                return _load(os.path.join(run_cfg.train_path, RESULTS), {})
    return summarise(run_cfg.train_path, [step for step, _ in steps])


def summarise(train_path: str, steps: list) -> dict:
    """Write the run's `results.json` and final `trained_params.pkl` (the last step's net), and
    log one line per step: accuracy, FLOPs against the first step's, params."""
    per_step = {step.step.name: _load(step.path(RESULTS), {}) for step in steps}
    final = steps[-1]
    output = os.path.join(train_path, OUTPUT)
    results = {**per_step[final.step.name], "steps": per_step}
    copy_net_files(final.output, output)
    atomic_write_json(os.path.join(train_path, RESULTS), results)
    first = next((entry for entry in per_step.values() if entry), {})
    full = first.get("full_ekg_flops") or 1
    for name, entry in per_step.items():
        if entry:
            log.info("summary %-12s top-1 %6.2f%%  %8.2f MFLOPs (EKG, %5.1f%% of the full net)  %.3f M params", name,
                     100 * entry.get("top1", float("nan")), entry.get("ekg_flops", 0) / 1e6,
                     100 * entry.get("ekg_flops", 0) / full, entry.get("params", 0) / 1e6)
    data = f" --data_path {final.run.data_path}" if final.run.data_path else ""
    log.info("final net: %s (evaluate it: python3 test.py --trained_param %s --dataset %s%s)", output, output,
             final.run.dataset, data)
    return results
