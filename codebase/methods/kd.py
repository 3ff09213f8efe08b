"""`--method kd`: Hinton knowledge distillation from a frozen teacher.

The student is `--arch`, trained from scratch, from `--trained_param`, or the previous step's
net in a chain (`--method l1,kd`: the pruned net fine-tuned with distillation). The teacher is
`--teacher_param` (any registered net, `--teacher_arch`, or a slimmed net with its spec), by
default the net the run started from (`--trained_param`, or the baseline the run trained): in
`l1,kd` the unpruned net. It is frozen: BN in inference mode, no update of any kind, its
forward pass inside the same compiled step as the student's (`codebase.tasks.Distill`).

Loss: `CE(y, s) + --kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))` at `--kd_temperature`
(Hinton et al.); `--kd_convention pocketflow` drops the `T^2` and uses the soft cross-entropy, as
PocketFlow's `--enbl_dst` did (with weight 4 and T 4). TensorBoard shows both terms
(`train/ce`, `train/kd`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from codebase import stages
from codebase.methods.base import Method, Stage, register
from codebase.options import Options, option, positive
from codebase.tasks import CONVENTIONS, Distill
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

TEACHER = "teacher.json"


@dataclasses.dataclass(frozen=True)
class KDOptions(Options):
    """Hinton KD's options."""

    teacher_arch: Optional[str] = option(None, "architecture of --teacher_param (default: its spec, else --arch)")
    teacher_param: Optional[str] = option(None, "params pickle of the frozen teacher (default: the net the run "
                                                "started from: --trained_param, or the baseline it trained)")
    kd_weight: float = option(1.0, "weight of the distillation term against the label cross-entropy")
    kd_temperature: float = option(4.0, "distillation temperature T")
    kd_convention: str = option("hinton", "hinton: weight * T^2 * KL; pocketflow: weight * soft cross-entropy, no "
                                          "T^2 (PocketFlow used weight 4, T 4)", choices=CONVENTIONS)

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(kd_temperature=self.kd_temperature)
        if not self.kd_weight >= 0:
            raise ConfigError(f"--kd_weight must be >= 0, got {self.kd_weight}")
        if self.teacher_param is not None and not os.path.isfile(self.teacher_param):
            raise ConfigError(f"--teacher_param {self.teacher_param} does not exist")


@register("kd")
class HintonKD(Method):
    Options = KDOptions
    trains = True

    @classmethod
    def check_chain(cls, cfg, index):
        step = cfg.steps[index]
        if step.options.teacher_param is None and index == 0 and cfg.run.trained_param is None:
            raise ConfigError("--method kd as the first step needs --teacher_param (or a --trained_param, or an "
                              "earlier step, whose starting net teaches)")

    def stages(self):
        return [Stage("train", self.train), Stage("test", self.test)]

    def teacher(self):
        """The frozen teacher, in the strategy's scope, and the file it came from."""
        path = self.options.teacher_param or self.step.origin
        if path is None:
            raise ConfigError("--method kd: no teacher; give --teacher_param")
        return self.ctx.load_net(path, arch=self.options.teacher_arch, any_arch=True), path

    def train(self):
        step, opts, ctx = self.step, self.options, self.ctx
        student = step.start_net()
        teacher, path = self.teacher()
        classes = (student.groups["logits"].size, teacher.groups["logits"].size)
        if classes[0] != classes[1]:
            raise ConfigError(f"--teacher_param {path}: the teacher has {classes[1]} classes, the student {classes[0]}")
        evaluated = ctx.evaluate(teacher)
        atomic_write_json(step.path(TEACHER), {"teacher": path, "arch": teacher.arch, "top1": evaluated["top1"],
                                               **teacher.cost().as_dict()})
        log.info("kd: teacher %s (%s), top1 %.4f; student %s from %s", path, ctx.describe(teacher),
                 evaluated["top1"], ctx.describe(student), step.input or "scratch")
        step.train(Distill(student, teacher, opts.kd_weight, opts.kd_temperature, opts.kd_convention), "train")
        step.save(student)

    def test(self):
        stages.test(self.step)
