"""What a Hinton-KD training step costs against its parts, in one process, interleaved.

Three compiled steps on random CIFAR-shaped data (batch 128, one replica, XLA off, the engine's
own `Trainer.train_step`), each timed as the median of `--steps` calls per round over `--rounds`
interleaved rounds:

* `student`: the student's plain training step (`Classify`);
* `teacher`: the teacher's inference forward pass on the same batch (what distillation adds);
* `kd`: the distillation step (`codebase.tasks.Distill`: student training + teacher forward in
  one compiled step).

The claim to check: `kd <= 1.1 x (student + teacher)`.

    python benchmarks/kd_step.py --student ResNet-20 --teacher ResNet-56 --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="ResNet-20")
    parser.add_argument("--teacher", default="ResNet-56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    import nets
    from codebase.tasks import Distill
    from op_utils.optim import SGD
    from op_utils.strategy import make_strategy
    from op_utils.task import Classify
    from op_utils.trainer import Trainer

    strategy = make_strategy(num_replicas=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, y)))))
    with strategy.scope():
        student_a = nets.build(args.student, masked=False)
        student_b = nets.build(args.student, masked=False)
        teacher = nets.build(args.teacher, masked=False)
        plain = Trainer(strategy, Classify(student_a), SGD(0.01, weight_decay=5e-4), global_batch_size=args.batch)
        kd = Trainer(strategy, Distill(student_b, teacher, 1.0, 4.0), SGD(0.01, weight_decay=5e-4),
                     global_batch_size=args.batch)
    forward = tf.function(lambda images: teacher(images, training=False))
    images = tf.constant(x)

    steps = {"student": lambda: float(plain.train_step(batch)["loss"]),
             "teacher": lambda: float(tf.reduce_sum(forward(images))),
             "kd": lambda: float(kd.train_step(batch)["loss"])}
    for fn in steps.values():  # trace and warm up
        fn()
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            tic = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - tic) / args.steps * 1e3)
    median = {name: statistics.median(v) for name, v in times.items()}
    ratio = median["kd"] / (median["student"] + median["teacher"])
    result = {"student": args.student, "teacher": args.teacher, "batch": args.batch, "ms": median,
              "rounds_ms": times, "kd_over_parts": ratio, "load": os.getloadavg(),
              "machine": f"{platform.node()} {os.cpu_count()} CPUs", "tf": tf.__version__}
    print(json.dumps(result, indent=1))
    print(f"kd step {median['kd']:.1f} ms = {ratio:.3f} x (student step {median['student']:.1f} ms + teacher forward "
          f"{median['teacher']:.1f} ms)")


if __name__ == "__main__":
    main()
