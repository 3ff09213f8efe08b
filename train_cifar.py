"""Train or compress a network on CIFAR-10/100 (or MNIST).

    python train_cifar.py --arch ResNet-56 --dataset cifar10 --train_path runs/res56
    python train_cifar.py --arch ResNet-56 --trained_param res56_cifar10.pkl --train_epoch 10 \
        --learning_rate 0.01 --data_path ~/data/cifar-10-batches-py --train_path runs/ft
    python train_cifar.py ... --resume          # continue an interrupted run

See docs/usage.md for every flag; `--config FILE` reads flags from JSON.
"""

from codebase.cli import training_main
from codebase.config import Config

PRESET = Config(arch="ResNet-56", dataset="cifar10", train_path="runs/resnet56_cifar10")

main = training_main(PRESET, __doc__.splitlines()[0])

if __name__ == "__main__":
    main()
