"""Evaluate a params pickle: accuracy, loss, params and FLOPs (both conventions), latency.

    python test.py --arch ResNet-56 --dataset cifar10 --data_path ~/data/cifar-10-batches-py \
        --trained_param runs/res56/trained_params.pkl --json

Slimmed pickles work as they are: their widths come from the `.arch.json` beside them or,
for EKG reference pickles, from the kernel shapes.
"""

from codebase.cli import guarded


@guarded
def main(argv=None):
    from codebase.evaluate import parse_args

    args = parse_args(argv)
    from codebase.evaluate import evaluate  # imports TensorFlow, after the flags are checked

    return evaluate(args)


if __name__ == "__main__":
    main()
