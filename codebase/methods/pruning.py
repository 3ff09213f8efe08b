"""The shape every channel-pruning method shares: choose masks, slim, fine-tune, test.

A pruning step starts from a trained net (the previous step's output, `--trained_param`, or
the baseline the run trains first), chooses which channels to keep, slims the net physically
and re-estimates its BatchNorm statistics on training images (slimming leaves the statistics
of the full net; test images are never used; `codebase.stages.save_pruned`). It then
fine-tunes with the step's optimisation, unless the next step of the chain trains the net
itself (`--method l1,kd`: the distillation does the fine-tuning), and tests.
"""

from __future__ import annotations

import dataclasses

from codebase import stages
from codebase.methods.base import Method, Stage
from codebase.options import Options, fraction, option, positive


@dataclasses.dataclass(frozen=True)
class FlopsTarget(Options):
    """The FLOPs target of the methods that prune to one (EKG convention)."""

    search_target_rate: float = option(0.45, "keep this fraction of the FLOPs (EKG convention: conv/FC MACs + BN)")

    def validate(self, **context) -> None:
        super().validate(**context)
        fraction("search_target_rate", self.search_target_rate)


@dataclasses.dataclass(frozen=True)
class Batched(Options):
    """The batch of the passes over training images that are not training (BN re-estimation, scoring)."""

    search_batch_size: int = option(256, "batch size of the search's passes and of the BN re-estimation after "
                                         "slimming (20 batches of training images)")

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(search_batch_size=self.search_batch_size)


class PruneMethod(Method):
    """Prune -> (fine-tune) -> test; subclasses implement `prune` (saving with `save_pruned`)."""

    needs_trained = True

    def stages(self):
        tail = [] if self.step.next_trains else [Stage("finetune", self.finetune)]
        return [Stage("prune", self.prune), *tail, Stage("test", self.test)]

    def prune(self):
        raise NotImplementedError

    def save_pruned(self, masked_net, info: dict) -> None:
        stages.save_pruned(self.step, masked_net, {"method": self.name, **info}, self.options.search_batch_size)

    def finetune_task(self):
        """`(make_task, data_fn)` of the fine-tuning: plain cross-entropy by default."""
        return None, None

    def finetune(self):
        make_task, data_fn = self.finetune_task()
        stages.finetune(self.step, self.step.path(stages.SLIMMED), make_task, data_fn)

    def test(self):
        stages.test(self.step)
