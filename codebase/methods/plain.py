"""`--method none`: train the network (from scratch or from `--trained_param`) and test it."""

from __future__ import annotations

import os

from codebase.context import finite, save_net
from codebase.methods.base import Method, Stage, register
from utils.atomic import atomic_write_json
from utils.logs import get_logger

log = get_logger(__name__)

TRAINED = "trained_params.pkl"


@register("none")
class PlainTraining(Method):
    def stages(self):
        return [Stage("train", self.train), Stage("test", self.test)]

    def train(self):
        ctx, cfg = self.ctx, self.cfg
        if cfg.trained_param:
            net = ctx.load_net(cfg.trained_param)
            log.info("loaded %s", cfg.trained_param)
        else:
            net = ctx.build_net()
        log.info(ctx.describe(net))
        ctx.train(net, cfg.train_epoch, stage="train")
        save_net(net, ctx.path(TRAINED))

    def test(self):
        ctx = self.ctx
        net = ctx.load_net(ctx.path(TRAINED))
        results = {**finite(ctx.evaluate(net)), **net.cost().as_dict()}
        atomic_write_json(ctx.path("results.json"), results)
        log.info("test: top1 %.4f top5 %.4f loss %.4f | %s", results["top1"], results["top5"],
                 results["loss"], net.cost().describe())
        log.info("saved %s", os.path.abspath(ctx.path(TRAINED)))
