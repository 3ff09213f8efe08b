"""Train or compress a network on CIFAR-10/100 (or MNIST).

    python train_cifar.py --arch ResNet-56 --dataset cifar10 --train_path runs/res56
    python train_cifar.py --arch ResNet-56 --trained_param res56_cifar10.pkl --train_epoch 10 \
        --learning_rate 0.01 --data_path ~/data/cifar-10-batches-py --train_path runs/ft
    python train_cifar.py ... --resume          # continue an interrupted run

See docs/usage.md for every flag; `--config FILE` reads flags from JSON.
"""

from codebase.cli import guarded
from codebase.config import Config, parse_config

PRESET = Config(arch="ResNet-56", dataset="cifar10", train_path="runs/resnet56_cifar10")


@guarded
def main(argv=None):
    cfg = parse_config(argv, PRESET, description=__doc__.splitlines()[0])
    from codebase.pipeline import run  # imports TensorFlow, after the flags are checked

    return run(cfg)


if __name__ == "__main__":
    main()
