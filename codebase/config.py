"""The run configuration: one frozen dataclass, made once, saved with the run, never mutated.

Precedence: dataclass defaults < the script's preset (CIFAR or ImageNet) < the method's preset
(`METHOD_PRESETS`) < `--config FILE` (JSON) < command-line flags. Flag names are those of the EKG
reference where they exist.
`validate()` turns every out-of-range value into a one-line `ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Optional, Sequence

from utils.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. See `--help` of the scripts for each field's meaning."""

    arch: str = "ResNet-56"
    dataset: str = "cifar10"
    data_path: Optional[str] = None
    image_size: Optional[int] = None  # ImageNet only: input side (default: the dataset's 224)
    train_path: str = "runs/resnet56_cifar10"
    trained_param: Optional[str] = None
    method: str = "none"
    # Optimisation (train.py of the EKG reference, for training from scratch).
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    schedule: str = "step"
    decay_points: tuple = (0.3, 0.6, 0.9)
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 128
    val_batch_size: int = 250
    train_epoch: int = 100
    steps_per_epoch: Optional[int] = None  # default: one pass over the training set
    # Engine.
    gpu_id: Optional[str] = None
    num_replicas: int = 1
    accum: int = 1
    compile: str = "auto"
    recompute: bool = False  # keep segment inputs only, recompute activations in the backward pass
    seed: int = 0
    do_log: int = 100
    ckpt_every_steps: Optional[int] = None
    resume: bool = False
    stop_after: Optional[str] = None  # run control like --resume: not compared on resume
    # Compression methods (EKG names; ignored by --method none).
    baseline_epoch: int = 100  # training from scratch when no --trained_param is given
    search_target_rate: float = 0.45  # kept fraction of FLOPs (EKG convention)
    search_step: float = 0.2
    search_round_to: int = 1  # 1: EKG's widths; N: widths are multiples of N (full blocks on CPU/GPU kernels)
    search_batch_size: int = 256
    search_cache_mb: int = 256  # segment inputs kept for the candidates; fewer when they do not fit
    search_train_per_class: int = 256  # warm-up subset: the first images of each class
    search_val_per_class: int = 32  # search-validation subset: the last images of each class
    num_teacher: int = 5
    knowledge: bool = True  # memory-bank distillation while fine-tuning (off: plain CE)
    temperature: float = 0.0  # 0: 4, or 10 with 1000 classes or more
    # ResRep (--method resrep; reference values of Ding et al. for ResNet-56 on CIFAR-10).
    resrep_epoch: int = 480  # training with compactors; --train_epoch is the optional fine-tuning after
    resrep_lambda: float = 1e-4  # group-lasso strength on the compactor rows
    resrep_interval: int = 200  # steps between mask updates
    resrep_before_mask: float = 5.0  # epochs of lasso only before the first mask update
    resrep_target: float = 0.471  # kept fraction of FLOPs (EKG convention)
    resrep_granularity: int = 4  # rows a mask update may close beyond those closed, while above target
    resrep_momentum: float = 0.99  # SGD momentum of the compactors (no weight decay on them)
    resrep_streams: bool = True  # also compact residual streams (the paper: single-writer groups only)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def validate(self) -> "Config":
        """Raise ConfigError naming the first bad value; return self for chaining."""
        positive = dict(learning_rate=self.learning_rate, batch_size=self.batch_size,
                        val_batch_size=self.val_batch_size, train_epoch=self.train_epoch,
                        num_replicas=self.num_replicas, accum=self.accum, do_log=self.do_log)
        if self.method == "resrep" and self.train_epoch == 0:
            positive.pop("train_epoch")  # ResRep's conversion is lossless: fine-tuning is optional
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name} must be positive, got {value!r}")
        if not 0 < self.search_target_rate < 1:
            raise ConfigError(f"--search_target_rate must be in (0, 1), got {self.search_target_rate}")
        if not 0 < self.search_step <= 1:
            raise ConfigError(f"--search_step must be in (0, 1], got {self.search_step}")
        for name in ("baseline_epoch", "search_batch_size", "search_round_to", "search_cache_mb",
                     "search_train_per_class", "search_val_per_class", "num_teacher"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        self._validate_resrep()
        for name in ("steps_per_epoch", "ckpt_every_steps", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be positive, got {value!r}")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"--weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.decay_rate <= 1:
            raise ConfigError(f"--decay_rate must be in (0, 1], got {self.decay_rate}")
        points = list(self.decay_points)
        if any(not 0 < p < 1 for p in points) or points != sorted(set(points)):
            raise ConfigError(f"--decay_points must be increasing fractions in (0, 1), got {points}")
        choices = dict(optimizer=("sgd", "adam"), schedule=("step", "cosine"),
                       compile=("auto", "on", "off"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.batch_size % (self.num_replicas * self.accum):
            raise ConfigError(f"--batch_size {self.batch_size} must be a multiple of "
                              f"--num_replicas x --accum = {self.num_replicas * self.accum}")
        dataset_options(self.dataset, self.image_size)
        if self.trained_param is not None and not os.path.isfile(self.trained_param):
            raise ConfigError(f"--trained_param {self.trained_param} does not exist")
        return self

    def _validate_resrep(self) -> None:
        for name in ("resrep_epoch", "resrep_interval", "resrep_granularity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)!r}")
        if not (self.resrep_lambda >= 0 and self.resrep_before_mask >= 0):
            raise ConfigError(f"--resrep_lambda and --resrep_before_mask must be >= 0, got "
                              f"{self.resrep_lambda} and {self.resrep_before_mask}")
        if not 0 < self.resrep_target < 1:
            raise ConfigError(f"--resrep_target must be in (0, 1), got {self.resrep_target}")
        if not 0 <= self.resrep_momentum < 1:
            raise ConfigError(f"--resrep_momentum must be in [0, 1), got {self.resrep_momentum}")
        if self.method == "resrep" and self.optimizer != "sgd":
            raise ConfigError("--method resrep needs --optimizer sgd (the compactors have their own momentum)")


# Fine-tuning defaults of the pruning methods: the EKG reference's train_cifar.py.
METHOD_PRESETS = {
    name: dict(learning_rate=0.01, weight_decay=5e-4, decay_points=(0.3, 0.6, 0.8), decay_rate=0.2,
               val_batch_size=256)
    for name in ("ekg", "l1", "random")
}
# ResRep's reference: cosine from 0.01 to 0 without warm-up, weight decay 1e-4, and no fine-tuning
# (the conversion is lossless); batch 64 on CIFAR and 256 on ImageNet come from the scripts' flags.
METHOD_PRESETS["resrep"] = dict(learning_rate=0.01, schedule="cosine", warmup_epochs=0.0, weight_decay=1e-4,
                                momentum=0.9, train_epoch=0)

_HELP = {
    "arch": "network, e.g. ResNet-56, ResNet-50, MobileNetV2, VGG-16",
    "dataset": "cifar10, cifar100, imagenet or mnist",
    "data_path": "dataset folder or archive (default: download through tf.keras.datasets)",
    "train_path": "output folder: config.json, checkpoints, TensorBoard logs, trained_params.pkl",
    "trained_param": "params pickle to start from ({'scope/var:0': ndarray}, EKG format)",
    "method": "compression method to run (none = plain training; the registered methods are listed on error)",
    "image_size": "ImageNet input height and width (the evaluation resize keeps the standard 256/224 of it); "
                  "small sizes make quick runs",
    "decay_points": "fractions of training at which the learning rate is multiplied by --decay_rate",
    "steps_per_epoch": "optimizer steps per epoch (default: one pass over the training set)",
    "gpu_id": "GPUs to use, e.g. '0' or '0,1' (default: all visible)",
    "num_replicas": "on a CPU-only machine, split the CPU into this many replicas",
    "accum": "micro-batches per step (gradient accumulation; equals the large batch)",
    "compile": "XLA for the per-replica step: auto (on with a GPU, off on CPU), on or off",
    "recompute": "recompute each network segment's activations in the backward pass instead of keeping "
                 "them (same results; ResNets train in about a quarter of the activation memory for "
                 "about a third more compute)",
    "do_log": "steps between logged / TensorBoard step scalars",
    "ckpt_every_steps": "also checkpoint every this many steps (default: every epoch)",
    "resume": "continue the run in --train_path from its last checkpoint",
    "stop_after": "stop after this stage of the method (e.g. search); --resume continues the run later",
    "search_target_rate": "stop the search when FLOPs (EKG convention) reach this fraction of the original",
    "search_step": "EKG width step of a gate (divided by the number of times its group is used)",
    "search_round_to": "keep every searched width a multiple of this (8 or 16: kernels run on full channel "
                       "blocks, so FLOPs saved become time saved); 1 = EKG's widths",
    "search_cache_mb": "memory for the search's cached segment inputs (candidates restart from them; "
                       "with less, fewer are cached and more is recomputed; same results)",
    "knowledge": "fine-tune with memory-bank distillation (--no-knowledge: plain cross-entropy)",
    "temperature": "distillation temperature (0: 4, or 10 with >= 1000 classes)",
    "train_epoch": "training epochs (with --method resrep: fine-tuning after the conversion, 0 = none)",
    "resrep_epoch": "ResRep: epochs of training with compactors (the --learning_rate schedule spans them)",
    "resrep_lambda": "ResRep: group-lasso strength on the compactor rows",
    "resrep_interval": "ResRep: steps between mask updates",
    "resrep_before_mask": "ResRep: epochs of lasso only before the first mask update",
    "resrep_target": "ResRep: keep this fraction of the FLOPs (EKG convention)",
    "resrep_granularity": "ResRep: rows one mask update may close beyond those already closed, while above target",
    "resrep_momentum": "ResRep: SGD momentum of the compactors (they get no weight decay)",
    "resrep_streams": "ResRep: also compact groups written by several convs, i.e. residual streams "
                      "(--no-resrep_streams: only single-writer groups, the paper's internal layers)",
}


def dataset_options(dataset: str, image_size: Optional[int]) -> dict:
    """The `build_dataset` options of `--image_size`: ImageNet's crop, and its evaluation resize in
    the standard 224:256 proportion; none without the flag. Raises ConfigError for another dataset."""
    if image_size is None:
        return {}
    if str(dataset).strip().lower() != "imagenet":
        raise ConfigError(f"--image_size applies to --dataset imagenet only, not {dataset}")
    return dict(image_size=image_size, resize_size=round(image_size * 256 / 224))


def _parser(defaults: Config, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file of config fields (flags override it)")
    for field in dataclasses.fields(Config):
        default = getattr(defaults, field.name)
        flag, help_ = f"--{field.name}", _HELP.get(field.name, "") + f" (default: {default})"
        if field.type == "bool" or isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif field.name == "decay_points":
            parser.add_argument(flag, type=float, nargs="+", default=None, help=help_)
        else:
            kind = {"float": float, "int": int}.get(field.type.replace("Optional[", "").rstrip("]"), str)
            parser.add_argument(flag, type=kind, default=None, help=help_)
    return parser


def parse_config(argv: Sequence[str] | None, preset: Config = Config(), description: str = "") -> Config:
    """Build the frozen config from a preset, an optional JSON file and the flags."""
    args = vars(_parser(preset, description).parse_args(argv))
    values = dataclasses.asdict(preset)
    config_file, overlay = args.pop("config"), {}
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:  # JSON is UTF-8, whatever the locale
                overlay = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"--config {config_file}: cannot read it ({err})") from None
        if not isinstance(overlay, dict):
            raise ConfigError(f"--config {config_file}: expected a JSON object of config fields, "
                              f"got {type(overlay).__name__}")
        unknown = sorted(set(overlay) - set(values))
        if unknown:
            raise ConfigError(f"--config {config_file}: unknown field {unknown[0]!r}")
    # The method's preset sits under the file, whichever of the file and the flags names the method.
    values.update(METHOD_PRESETS.get(args["method"] or overlay.get("method") or preset.method, {}))
    values.update(overlay)
    values.update({k: v for k, v in args.items() if v is not None})
    values["decay_points"] = tuple(values["decay_points"])
    return Config(**values).validate()


def load_config(path: str) -> Config:
    """Read a saved `config.json` back into a Config."""
    with open(path) as f:
        values = json.load(f)
    values["decay_points"] = tuple(values["decay_points"])
    return Config(**values)
