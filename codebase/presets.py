"""Dataset presets as code: the optimisation recipes a step starts from.

Two recipes per dataset, named after what the training does:

* `scratch`: training a net from its random initialisation (`--method none` without
  `--trained_param`, the baseline a pruning run trains when it is given no trained net);
* `finetune`: training a net that is already trained (after pruning, distillation into a
  pruned student, quantization-aware training).

A method picks its recipe (`Method.recipe`) and may change a few fields of it
(`Method.optim_defaults`, e.g. ResRep's cosine schedule); `--config` and flags override both.
So `train_imagenet.py --method ekg` fine-tunes with ImageNet's weight decay, not CIFAR's.

The CIFAR recipes are the EKG reference's (`train.py` standalone for scratch, `train_cifar.py`
for fine-tuning), the ImageNet ones the usual 90-epoch ResNet schedule and EKG's fine-tuning
schedule with ImageNet's weight decay.
"""

from __future__ import annotations

_CIFAR = {
    "scratch": dict(optimizer="sgd", learning_rate=0.05, schedule="step", decay_points=(0.3, 0.6, 0.9),
                    decay_rate=0.1, weight_decay=1e-4, momentum=0.9, batch_size=128, train_epoch=100),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, schedule="step", decay_points=(0.3, 0.6, 0.8),
                     decay_rate=0.2, weight_decay=5e-4, momentum=0.9, batch_size=128, train_epoch=100),
}
_IMAGENET = {
    "scratch": dict(optimizer="sgd", learning_rate=0.1, schedule="step", decay_points=(0.33, 0.67, 0.89),
                    decay_rate=0.1, weight_decay=1e-4, momentum=0.9, batch_size=256, train_epoch=90),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, schedule="step", decay_points=(0.3, 0.6, 0.8),
                     decay_rate=0.2, weight_decay=1e-4, momentum=0.9, batch_size=256, train_epoch=90),
}
RECIPES = {"cifar10": _CIFAR, "cifar100": _CIFAR, "mnist": _CIFAR, "imagenet": _IMAGENET}
KINDS = ("scratch", "finetune")


def recipe(dataset: str, kind: str) -> dict:
    """The optimisation fields of `kind` ("scratch" or "finetune") for `dataset`."""
    if kind not in KINDS:
        raise ValueError(f"unknown recipe {kind!r}; known: {', '.join(KINDS)}")
    return dict(RECIPES.get(str(dataset).lower(), _CIFAR)[kind])
