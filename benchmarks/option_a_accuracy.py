"""Top-1 of the PyTorch option-A ResNet-20/32/44/56 weights on the real CIFAR-10 test images.

Each `.npz` (akamaster/pytorch_resnet_cifar10, converted; `../shared/data/README.md`, section
"pretrained/option_a") is evaluated through `test.py`'s own code (`codebase.evaluate`): the
same `load_net` import, input affine and evaluator the scripts use, moving statistics, one
replica. Prints one JSON object; the README's figures on the 1,017 real test images are
ResNet-20 91.64%, ResNet-32 92.82%, ResNet-44 93.41%, ResNet-56 92.72%.

Usage (from the repository root)::

    python benchmarks/option_a_accuracy.py
    python benchmarks/option_a_accuracy.py --data_path ~/data/cifar-10-batches-py --depths 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(_ROOT, "..", "shared", "data")
EXPECTED = {20: 0.9164, 32: 0.9282, 44: 0.9341, 56: 0.9272}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default=os.path.join(_SHARED, "cifar-10-batches-py"))
    parser.add_argument("--weights", default=os.path.join(_SHARED, "pretrained", "option_a"),
                        help="folder of resnet{depth}_cifar10_option_a.npz")
    parser.add_argument("--depths", type=int, nargs="+", default=sorted(EXPECTED), choices=sorted(EXPECTED))
    args = parser.parse_args(argv)
    paths = {d: os.path.join(args.weights, f"resnet{d}_cifar10_option_a.npz") for d in args.depths}
    for path in [args.data_path, *paths.values()]:
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")

    sys.path.insert(0, _ROOT)
    from codebase.evaluate import evaluate, parse_args

    results = {}
    for depth, path in paths.items():
        flags = ["--arch", f"ResNet-{depth}A", "--data_path", args.data_path, "--trained_param", path,
                 "--latency_runs", "1", "--json"]
        with contextlib.redirect_stdout(io.StringIO()):  # test.py's own JSON line; ours is printed below
            result = evaluate(parse_args(flags))
        results[f"ResNet-{depth}A"] = {"top1": result["top1"], "count": result["count"],
                                       "expected_top1": EXPECTED[depth],
                                       "images_off": round((result["top1"] - EXPECTED[depth]) * result["count"]),
                                       "macs": result["macs"], "params": result["params"]}
    print(json.dumps({"data_path": os.path.abspath(args.data_path), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
