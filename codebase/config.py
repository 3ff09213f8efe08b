"""The run configuration: frozen dataclasses, made once, saved with the run, never mutated.

A `Config` is the run's own options (`RunConfig`: network, data, output folder, engine) and an
ordered chain of `Step`s, one per method of `--method a,b,...` (or of the `steps` list of a
`--config` file), each with its method's own options (declared in the method's module) and
its own optimisation (`OptimConfig`). When the first method needs a trained net and no
`--trained_param` is given, a `0-baseline` step (plain training from scratch) comes first.

Precedence, for each step: dataclass defaults < the dataset's recipe for the step
(`codebase/presets.py`, chosen by the method: scratch or finetune) < the method's changes to
it < the script's own defaults (`--arch`, `--dataset`, `--train_path`) < `--config FILE`
(top-level fields, then the step's entry in its `steps` list) < command-line flags, which
apply to every step of the method they belong to. A flag or `--config` field that belongs to
no method of the run is an error, as is any out-of-range value: one line that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional, Sequence

from codebase import presets
from codebase.options import Options, build, fraction, option, positive, run_control_fields, thread_counts
from utils.errors import ConfigError

PRECISIONS = ("float32", "bfloat16")  # --precision (utils.devices.use_precision)


# The formats of `codebase.export` (kept here, where flags are checked before TensorFlow is imported).
EXPORT_FORMATS = ("saved_model", "tflite_fp32", "tflite_fp16", "tflite_dynamic_int8", "tflite_int8")


@dataclasses.dataclass(frozen=True)
class RunConfig(Options):
    """The network, the data, the output folder and the engine: shared by every step."""

    arch: str = option("ResNet-56", "network, e.g. ResNet-56, ResNet-50, MobileNetV2, VGG-16, LeNet-5")
    dataset: str = option("cifar10", "cifar10, cifar100, imagenet or mnist")
    data_path: Optional[str] = option(None, "dataset folder or archive (default: download through tf.keras.datasets)")
    image_size: Optional[int] = option(None, "input height and width, at least 8: imagenet crops to it (evaluation "
                                             "resize in the standard 224:256 proportion; default 224), mnist resizes "
                                             "its 28x28 images to it (e.g. 32 for the 32x32 LeNet-5 of Lopes et al.)")
    train_path: str = option("runs/resnet56_cifar10", "output folder: config.json, log.txt, one folder per step, "
                                                      "results.json, the final trained_params.pkl",
                             run_control=True)  # a run folder may be moved before it is resumed
    trained_param: Optional[str] = option(None, "params pickle to start from ({'scope/var:0': ndarray}, EKG format; "
                                                "a .arch.json spec beside it gives a slimmed net's widths), or a "
                                                ".npz of PyTorch weights for an --arch that imports them "
                                                "(ResNet-20A/32A/44A/56A)")
    method: str = option("none", "compression method, or a chain of them run in order, e.g. ekg, l1,kd "
                                 "(none = plain training); each step in its own subfolder")
    val_batch_size: int = option(250, "evaluation batch size")
    baseline_epoch: int = option(100, "epochs of the baseline a pruning run trains when no --trained_param is given "
                                      "(the dataset's scratch recipe)")
    baseline_learning_rate: Optional[float] = option(None, "learning rate of that baseline (default: the recipe's)")
    gpu_id: Optional[str] = option(None, "GPUs to use, e.g. '0' or '0,1' (default: all visible)")
    num_replicas: int = option(1, "on a CPU-only machine, split the CPU into this many replicas")
    accum: int = option(1, "micro-batches per step (gradient accumulation; equals the large batch)")
    compile: str = option("auto", "XLA for the per-replica step: auto (on with a GPU, off on CPU), on or off",
                          choices=("auto", "on", "off"))
    precision: str = option("float32", "arithmetic of the traced functions: float32, or bfloat16 (grappler's oneDNN "
                                       "rewrite; needs a CPU with AVX512-BF16 or AMX; changes numerics)",
                            choices=PRECISIONS)
    intra_op_threads: int = option(0, "TensorFlow threads inside one op; 0 = one per core (fewer: a run that "
                                      "shares the machine)", run_control=True)
    inter_op_threads: int = option(0, "TensorFlow threads running independent ops; 0 = one per core",
                                   run_control=True)
    recompute: bool = option(False, "recompute each network segment's activations in the backward pass instead of "
                                    "keeping them (same results; ResNets train in about a quarter of the activation "
                                    "memory for about a third more compute)", run_control=True)
    seed: int = option(0, "run seed: data order, augmentation, initialisation")
    do_log: int = option(100, "steps between logged / TensorBoard step scalars")
    ckpt_every_steps: Optional[int] = option(None, "also checkpoint every this many steps (default: every epoch)")
    resume: bool = option(False, "continue the run in --train_path from its last checkpoint", run_control=True)
    stop_after: Optional[str] = option(None, "stop after this stage (e.g. search, or 1-ekg/search); --resume "
                                             "continues the run later", run_control=True)
    cifar_padding: str = option("reflect", "CIFAR training crops: border filled by reflection (the EKG reference's) "
                                           "or black (torchvision's and TF's official pipelines; keeps the BN "
                                           "statistics of weights trained that way, e.g. the option-A ResNets)",
                                choices=("reflect", "black"))
    export: tuple[str, ...] = option((), "after the last step, export its net in these formats ("
                                         + ", ".join(EXPORT_FORMATS) + ") into <last step>/export, each file's "
                                         "top-1 on the test set beside the TF net's (as export.py --eval)")

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(val_batch_size=self.val_batch_size, num_replicas=self.num_replicas, accum=self.accum,
                 do_log=self.do_log, baseline_epoch=self.baseline_epoch, ckpt_every_steps=self.ckpt_every_steps,
                 baseline_learning_rate=self.baseline_learning_rate, image_size=self.image_size)
        thread_counts(intra_op_threads=self.intra_op_threads, inter_op_threads=self.inter_op_threads)
        if self.trained_param is not None and not os.path.isfile(self.trained_param):
            raise ConfigError(f"--trained_param {self.trained_param} does not exist")
        dataset_options(self.dataset, self.image_size)
        if self.cifar_padding != "reflect" and not str(self.dataset).lower().startswith("cifar"):
            raise ConfigError(f"--cifar_padding applies to CIFAR datasets only, not {self.dataset}")
        unknown = sorted(set(self.export) - set(EXPORT_FORMATS))
        if unknown:
            raise ConfigError(f"--export {unknown[0]!r} is not a format; known: {', '.join(EXPORT_FORMATS)}")

    def methods(self) -> list:
        return [m.strip() for m in self.method.split(",")]


@dataclasses.dataclass(frozen=True)
class OptimConfig(Options):
    """How one step trains: optimizer, schedule, batch and duration."""

    optimizer: str = option("sgd", "sgd (Nesterov momentum) or adam", choices=("sgd", "adam"))
    learning_rate: float = option(0.05, "initial learning rate")
    schedule: str = option("step", "learning-rate schedule: step (x --decay_rate at --decay_points), cosine, "
                                   "constant, poly ((1 - epoch/epochs)^--poly_power) or plateau (x --plateau_factor "
                                   "after --plateau_patience epochs without a lower training loss)",
                           choices=("step", "cosine", "constant", "poly", "plateau"))
    decay_points: tuple[float, ...] = option((0.3, 0.6, 0.9), "fractions of training at which the learning rate is "
                                                              "multiplied by --decay_rate")
    decay_rate: float = option(0.1, "factor of each step decay")
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs")
    poly_power: float = option(0.9, "exponent of the poly schedule")
    plateau_factor: float = option(0.1, "plateau schedule: factor of each reduction")
    plateau_patience: int = option(4, "plateau schedule: epochs without improvement before a reduction")
    plateau_min_lr: float = option(1e-7, "plateau schedule: the lowest learning rate")
    weight_decay: float = option(1e-4, "L2 coefficient added to every trained variable's gradient")
    momentum: float = option(0.9, "SGD momentum")
    batch_size: int = option(128, "global batch size (all replicas and micro-batches)")
    train_epoch: int = option(100, "training epochs")
    steps_per_epoch: Optional[int] = option(None, "optimizer steps per epoch (default: one pass over the training set)")

    def validate(self, run: RunConfig | None = None, allow_no_training: bool = False, **context) -> None:
        super().validate()
        positive(learning_rate=self.learning_rate, batch_size=self.batch_size, steps_per_epoch=self.steps_per_epoch)
        if not (allow_no_training and self.train_epoch == 0):
            positive(train_epoch=self.train_epoch)
        fraction("weight_decay", self.weight_decay, low_open=False)
        fraction("momentum", self.momentum, low_open=False)
        fraction("decay_rate", self.decay_rate, high_open=False)
        positive(poly_power=self.poly_power, plateau_patience=self.plateau_patience)
        fraction("plateau_factor", self.plateau_factor)
        if not self.plateau_min_lr >= 0:
            raise ConfigError(f"--plateau_min_lr must be >= 0, got {self.plateau_min_lr}")
        if not self.warmup_epochs >= 0:
            raise ConfigError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
        points = list(self.decay_points)
        if any(not 0 < p < 1 for p in points) or points != sorted(set(points)):
            raise ConfigError(f"--decay_points must be increasing fractions in (0, 1), got {points}")
        if run is not None and self.batch_size % (run.num_replicas * run.accum):
            raise ConfigError(f"--batch_size {self.batch_size} must be a multiple of "
                              f"--num_replicas x --accum = {run.num_replicas * run.accum}")


@dataclasses.dataclass(frozen=True)
class Step:
    """One method of the chain: its folder name (`1-ekg`), options and optimisation."""

    name: str
    method: str
    options: Options
    optim: OptimConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """The run: its own options and its chain of steps."""

    run: RunConfig
    steps: tuple

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def to_dict(self) -> dict:
        return {"run": self.run.to_dict(),
                "steps": [{"name": s.name, "method": s.method, "options": s.options.to_dict(),
                           "optim": s.optim.to_dict()} for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def comparable(self) -> dict:
        """`to_dict()` without the run-control options (those may differ on `--resume`)."""
        out = self.to_dict()
        for name in run_control_fields(RunConfig):
            out["run"].pop(name, None)
        for entry, step in zip(out["steps"], self.steps):
            for name in run_control_fields(type(step.options)):
                entry["options"].pop(name, None)
        return out


# === Building a Config ===
def _fields(owner) -> set:
    return {f.name for f in dataclasses.fields(owner)}


def _method_table():
    from codebase.methods import get_method, method_names

    return {name: get_method(name) for name in method_names()}


def option_owners(methods: dict) -> dict:
    """`{option field: [method names]}` over every registered method."""
    owners: dict = {}
    for name, cls in methods.items():
        for field in _fields(cls.Options):
            owners.setdefault(field, []).append(name)
    return owners


def _read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            overlay = json.load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config fields, got {type(overlay).__name__}")
    return overlay


def make_config(values: dict, flags: dict, where: str = "config", script: dict | None = None) -> Config:
    """Build and validate a Config from a `--config`-style dict and the given flags (see the
    module docstring for the precedence). `script` holds the script's own run defaults."""
    methods = _method_table()
    owners = option_owners(methods)
    run_names, optim_names = _fields(RunConfig), _fields(OptimConfig)
    known = run_names | optim_names | set(owners) | {"steps"}
    for source, mapping in ((where, values), ("flags", flags)):
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}")

    run_values = {**(script or {}), **{k: v for k, v in values.items() if k in run_names},
                  **{k: v for k, v in flags.items() if k in run_names}}
    entries = values.get("steps")
    if entries is not None:
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "method" in e for e in entries):
            raise ConfigError(f"{where}: steps must be a list of objects with a 'method'")
        chain = ",".join(str(e["method"]) for e in entries)
        if "method" in flags and flags["method"].replace(" ", "") != chain:
            raise ConfigError(f"--method {flags['method']} differs from the steps of {where} ({chain}); give one")
        run_values["method"] = chain
    run = build(RunConfig, run_values, where)
    chain = run.methods()
    for name in chain:
        if name not in methods:
            raise ConfigError(f"unknown --method {name!r}; known: {', '.join(methods)}")
    entries = entries or [{"method": name} for name in chain]

    used = {field for name in chain for field in _fields(methods[name].Options)}
    for source, mapping in ((where, values), ("flags", flags)):
        for field in sorted(set(mapping) & set(owners) - used):
            owner = " / ".join(f"--method {m}" for m in owners[field])
            flag = f"--{field}" if source == "flags" else f"field {field!r}"
            raise ConfigError(f"{source}: {flag} is an option of {owner}, which this run does not use")

    steps = []
    pretrained = run.trained_param is not None
    first = methods[chain[0]]
    first_options = build(first.Options, _step_values(first, values, entries[0], flags), where)
    if first.needs_trained and not first.from_scratch(first_options) and not pretrained:
        steps.append(baseline_step(run, flags, values))
        pretrained = True
    for index, (name, entry) in enumerate(zip(chain, entries), start=1):
        cls = methods[name]
        unknown = sorted(set(entry) - {"method"} - optim_names - _fields(cls.Options))
        if unknown:
            raise ConfigError(f"{where}: step {index} ({name}) has no field {unknown[0]!r}")
        options = build(cls.Options, _step_values(cls, values, entry, flags), where)
        fresh = cls.from_scratch(options)
        optim = {**presets.recipe(run.dataset, cls.recipe_for(pretrained and not fresh)),
                 **cls.optim_defaults(run.dataset)}
        for source in (values, entry, flags):
            optim.update({k: v for k, v in source.items() if k in optim_names})
        steps.append(Step(f"{index}-{name}", name, options, build(OptimConfig, optim, where)))
        pretrained = pretrained or cls.produces_trained
    return validate(Config(run, tuple(steps)))


def _step_values(cls, values: dict, entry: dict, flags: dict) -> dict:
    """The option values of a step of method `cls`: config file, then its steps entry, then flags."""
    opts = {}
    for source in (values, entry, flags):
        opts.update({k: v for k, v in source.items() if k in _fields(cls.Options)})
    return opts


def baseline_step(run: RunConfig, flags: dict, values: dict) -> Step:
    """The `0-baseline` step: plain training from scratch with the dataset's scratch recipe,
    `--baseline_epoch` epochs at `--baseline_learning_rate`; the batch size, optimizer and
    steps per epoch of the run's flags and config apply to it too."""
    from codebase.methods import get_method

    optim = presets.recipe(run.dataset, "scratch")
    for source in (values, flags):
        optim.update({k: v for k, v in source.items() if k in ("batch_size", "optimizer", "steps_per_epoch")})
    optim["train_epoch"] = run.baseline_epoch
    if run.baseline_learning_rate is not None:
        optim["learning_rate"] = run.baseline_learning_rate
    return Step("0-baseline", "none", get_method("none").Options(), build(OptimConfig, optim, "baseline"))


def validate(cfg: Config) -> Config:
    """Every option's checks, then each method's checks of its place in the chain."""
    from codebase.methods import get_method

    cfg.run.validate()
    for index, step in enumerate(cfg.steps):
        cls = get_method(step.method)
        step.optim.validate(run=cfg.run, allow_no_training=cls.trains_optional(step.options))
        step.options.validate(run=cfg.run, optim=step.optim)
        cls.check_chain(cfg, index)
    return cfg


def dataset_options(dataset: str, image_size: Optional[int]) -> dict:
    """The `build_dataset` options of `--image_size`: ImageNet's crop, and its evaluation resize in
    the standard 224:256 proportion; MNIST's resize; none without the flag. Raises ConfigError for
    another dataset and for a size below 8."""
    if image_size is None:
        return {}
    key = str(dataset).strip().lower()
    if key not in ("imagenet", "mnist"):
        raise ConfigError(f"--image_size applies to --dataset imagenet or mnist, not {dataset}")
    if image_size < 8:
        raise ConfigError(f"--image_size must be at least 8, got {image_size}")
    if key == "mnist":
        return dict(image_size=image_size)
    return dict(image_size=image_size, resize_size=round(image_size * 256 / 224))


def _parser(description: str, script: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file of config fields, and optionally a 'steps' list of per-step "
                                         "objects ({'method': ..., fields}); flags override it")
    methods = _method_table()
    groups = [("run and engine", [(RunConfig, f) for f in dataclasses.fields(RunConfig)], script),
              ("optimisation of each step (default: the dataset's recipe for the method, see codebase/presets.py)",
               [(OptimConfig, f) for f in dataclasses.fields(OptimConfig)], {})]
    # Methods' options, grouped by the methods that share them (one dataclass, so one flag).
    owners, shared, seen = option_owners(methods), {}, set()
    for cls in methods.values():
        for field in dataclasses.fields(cls.Options):
            if field.name not in seen:
                seen.add(field.name)
                shared.setdefault(tuple(owners[field.name]), []).append((cls.Options, field))
    groups += [("options of " + ", ".join(f"--method {m}" for m in who), fields, {}) for who, fields in shared.items()]
    for title, fields, defaults in groups:
        group = parser.add_argument_group(title)
        for owner, field in fields:
            _add_flag(group, owner, field, defaults.get(field.name, field.default))
    return parser


def _add_flag(group, owner, field, default) -> None:
    from codebase.options import field_kind

    kind, _, sequence = field_kind(field, owner)
    help_ = field.metadata.get("help", "") + f" (default: {default})"
    flag = f"--{field.name}"
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
    elif sequence:
        group.add_argument(flag, type=kind, nargs="+", default=None, help=help_)
    else:
        group.add_argument(flag, type=kind, default=None, help=help_)


def parse_config(argv: Sequence[str] | None, script: dict | None = None, description: str = "") -> Config:
    """The frozen config of a script's command line (`script`: its own run defaults)."""
    script = dict(script or {})
    args = vars(_parser(description, script).parse_args(argv))
    config_file = args.pop("config")
    flags = {k: v for k, v in args.items() if v is not None}
    values = _read_config_file(config_file) if config_file else {}
    return make_config(values, flags, where=f"--config {config_file}" if config_file else "config", script=script)


def load_config(path: str) -> Config:
    """Read a run's saved `config.json` back into a Config."""
    from codebase.methods import get_method

    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        run = build(RunConfig, saved["run"], path)
        steps = tuple(Step(s["name"], s["method"], build(get_method(s["method"]).Options, s["options"], path),
                           build(OptimConfig, s["optim"], path)) for s in saved["steps"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a config.json of this toolkit ({type(err).__name__}: {err})") from None
    return Config(run, steps)


def flags_markdown() -> str:
    """The flags reference of `docs/usage.md`, generated from the option declarations."""
    from codebase.options import field_kind

    methods = _method_table()
    sections = [("Run and engine", RunConfig), ("Optimisation of each step", OptimConfig)]
    sections += [(f"`--method {name}`", cls.Options) for name, cls in methods.items()]
    seen, lines = set(), []
    for title, owner in sections:
        rows = []
        for field in dataclasses.fields(owner):
            if field.name in seen:
                continue
            seen.add(field.name)
            kind, optional, sequence = field_kind(field, owner)
            default = field.default
            shown = "-" if default is None else " ".join(map(str, default)) if sequence else str(default)
            flag = f"--[no-]{field.name}" if kind is bool else f"--{field.name}"
            rows.append(f"| `{flag}` | {shown} | {field.metadata.get('help', '')} |")
        if rows:
            lines += [f"### {title}", "", "| flag | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
