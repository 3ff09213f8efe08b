"""Where EKG's search process keeps its memory: resident size after each part, in one process.

``--part warmup`` runs ``train_cifar.py --method ekg ... --stop_after warmup`` in this process, then
collects garbage and trims the heap, and reports what stays resident (TensorFlow's runtime, its CPU
allocator's pool, live numpy arrays). ``--part search`` builds the search on the 320
search-validation images (the last 32 of each class, as the pipeline takes them) from the pretrained
net and reports after tracing the segment functions, after the first score pass, and after each step.
``--part functions`` traces ResNet-56's forward as 29 segment functions, as one function, or as one
function with a ``tf.cond`` per segment, on 4 images, and reports what tracing added.

Usage (from the repository root; about a minute per part on 2 cores)::

    python benchmarks/search_memory.py --part warmup --data_path ../shared/data/cifar-10-batches-py \\
        --trained_param ../shared/data/pretrained/res56_cifar10.pkl
    python benchmarks/search_memory.py --part search --steps 8 ...same paths...
    python benchmarks/search_memory.py --part functions --functions separate   # or whole, cond
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(what: str) -> None:
    import tensorflow as tf

    from utils.memory import resident_mb

    info = tf.config.experimental.get_memory_info("CPU:0")
    print(f"{what}: {resident_mb():.0f} MB resident; TF allocator current {info['current'] / 2 ** 20:.0f} MB, "
          f"peak {info['peak'] / 2 ** 20:.0f} MB", flush=True)


def warmup(args) -> None:
    import numpy as np

    import train_cifar
    from utils.memory import release_freed_memory

    run = tempfile.mkdtemp(prefix="search_memory_")
    try:
        train_cifar.main(["--method", "ekg", *(["--recompute"] if args.recompute else []), "--arch", "ResNet-56", "--dataset", "cifar10", "--data_path",
                          args.data_path, "--trained_param", args.trained_param, "--train_path", run,
                          "--seed", "1", "--stop_after", "warmup"])
    finally:
        shutil.rmtree(run, ignore_errors=True)
    release_freed_memory()
    report("after the warm-up stage, garbage collected and trimmed")
    arrays = [o for o in gc.get_objects() if isinstance(o, np.ndarray)]
    print(f"numpy arrays alive: {len(arrays)}, {sum(a.nbytes for a in arrays) / 2 ** 20:.1f} MB")


def search(args) -> None:
    import numpy as np

    from codebase.artifacts import load_net
    from codebase.methods.ekg.method import EKGOptions
    from codebase.methods.ekg.method import search_subsets
    from codebase.methods.ekg.search import GreedySearch
    from dataloader import build_dataset

    data = build_dataset("cifar10", args.data_path)
    labels = np.concatenate([b[1].numpy() for b in data.train_eval(1024)])
    _, val = search_subsets(labels, 256, 32)
    images = np.concatenate([b[0].numpy() for b in data.train_eval(1024)])[val]
    net = load_net("ResNet-56", args.trained_param, masked=True)
    report("net built")
    steps = []

    def on_step(state, info):
        steps.append(state.step)
        report(f"step {state.step} ({info['seconds']:.1f} s)")
        if len(steps) >= args.steps:
            raise StopIteration

    s = GreedySearch(net, images, labels[val].astype(np.int32), on_step=on_step,
                     cache_mb=args.cache_mb or EKGOptions().search_cache_mb)
    print(f"segment inputs cached: {len(s.cached)} of {len(s.segments)}")
    state = s.initial_state()
    report("segment functions traced and run on the 320 images")
    s.apply(state.rates, state.orders)
    s.score(state.knowledge)
    report("first score pass (segment cache + chunk functions)")
    try:
        s.run(state)
    except StopIteration:
        pass


def functions(args) -> None:
    import tensorflow as tf

    from codebase.artifacts import load_net
    from utils.memory import release_freed_memory, resident_mb

    net = load_net("ResNet-56", args.trained_param, masked=True)
    net.options.set(renorm=True, freeze_bn=True, compact=True)
    segments = net.segments()
    x = tf.random.normal([4, 32, 32, 3])
    release_freed_memory()
    base = resident_mb()
    kept = []  # alive afterwards, as the search keeps its functions
    if args.functions == "separate":
        for seg in segments:
            kept.append(tf.function(lambda y, f=seg.fn: f(y, True)))
            x = kept[-1](x)
    elif args.functions == "whole":
        kept.append(tf.function(lambda y: net.forward(y, True)))
        kept[-1](x)
    else:
        def run(y, start):
            for i, seg in enumerate(segments[:-1]):
                y = tf.cond(start <= i, lambda s=seg, y=y: s.fn(y, True), lambda y=y: tf.identity(y))
            return segments[-1].fn(y, True)

        kept.append(tf.function(run, input_signature=[tf.TensorSpec([None] * 4), tf.TensorSpec([], tf.int32)]))
        kept[-1](x, tf.constant(0))
    release_freed_memory()
    print(f"{args.functions}: tracing and running added {resident_mb() - base:.0f} MB resident")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("warmup", "search", "functions"), required=True)
    parser.add_argument("--data_path", default=os.path.join(_ROOT, "..", "shared", "data", "cifar-10-batches-py"))
    parser.add_argument("--trained_param",
                        default=os.path.join(_ROOT, "..", "shared", "data", "pretrained", "res56_cifar10.pkl"))
    parser.add_argument("--steps", type=int, default=8, help="search: steps to report")
    parser.add_argument("--recompute", action="store_true", help="warmup: train with --recompute")
    parser.add_argument("--cache_mb", type=int, default=None,
                        help="search: memory for cached segment inputs (default: --search_cache_mb's)")
    parser.add_argument("--functions", choices=("separate", "whole", "cond"), default="separate")
    args = parser.parse_args(argv)
    for path in (args.trained_param,) + ((args.data_path,) if args.part != "functions" else ()):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")
    sys.path.insert(0, _ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from utils.memory import resident_mb

    print(f"before TensorFlow: {resident_mb():.0f} MB resident", flush=True)
    import tensorflow  # noqa: F401  (measured on its own)

    print(f"TensorFlow imported: {resident_mb():.0f} MB resident", flush=True)
    {"warmup": warmup, "search": search, "functions": functions}[args.part](args)


if __name__ == "__main__":
    main()
