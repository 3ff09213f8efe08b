"""`--method none`: train the net with cross-entropy (from scratch, from `--trained_param`, or the
previous step's output) and test it. The baseline of a pruning run is this method too."""

from __future__ import annotations

from codebase import stages
from codebase.methods.base import Method, Stage, register
from utils.logs import get_logger

log = get_logger(__name__)


@register("none")
class PlainTraining(Method):
    trains = True

    def stages(self):
        return [Stage("train", self.train), Stage("test", self.test)]

    def train(self):
        step = self.step
        net = step.start_net()
        log.info("%s: %s, from %s", step.step.name, self.ctx.describe(net), step.input or "scratch")
        step.train(net, "train")
        step.save(net)

    def test(self):
        stages.test(self.step)
