"""Train or compress a network on CIFAR-10/100 (or MNIST).

    python train_cifar.py --method ekg --arch LeNet-5 --dataset mnist --train_path runs/quickstart
    python train_cifar.py --method ekg --arch ResNet-56 --trained_param res56_cifar10.pkl \
        --data_path ~/data/cifar-10-batches-py --train_path runs/ekg
    python train_cifar.py --method l1,kd ...     # a chain: L1 pruning, then distillation from the unpruned net
    python train_cifar.py ... --resume           # continue an interrupted run

See docs/usage.md for runs, chains and every flag; `--config FILE` reads them from JSON.
"""

from codebase.cli import training_main

SCRIPT = dict(arch="ResNet-56", dataset="cifar10", train_path="runs/resnet56_cifar10")

main = training_main(SCRIPT, __doc__.splitlines()[0])

if __name__ == "__main__":
    main()
