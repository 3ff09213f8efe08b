"""Trains the toy MLP with ``op_utils.loop.fit``; the subprocess tests drive this script.

Run from the repository root as a module, e.g.::

    python -m tests.op_utils.train_toy --train_path /tmp/run --out /tmp/run/result

With ``TF_CONFIG`` naming two workers it trains under MultiWorkerMirroredStrategy. It
writes ``<out>.npz`` (final trainable variables, in model order) and ``<out>.json``
(final logs, step counters and the position it resumed from).
"""
import argparse
import json
import os
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--out", required=True, help="output prefix for .npz and .json")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps_per_epoch", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--replicas", type=int, default=2, help="CPU replicas (single process)")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--ckpt_every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step_delay", type=float, default=0.0,
                        help="seconds of sleep per batch, so a test can kill mid-run")
    parser.add_argument("--delay_from_epoch", type=int, default=0,
                        help="the first (0-based) epoch whose batches --step_delay slows")
    parser.add_argument("--start_file", default=None,
                        help="set up, then wait for this file to exist before training")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from op_utils.loop import fit
    from op_utils.optim import SGD
    from op_utils.schedules import StepDecay
    from op_utils.strategy import make_strategy
    from op_utils.task import Classify
    from op_utils.trainer import Trainer
    from tests.support.toy import MLP, make_train_data_fn, toy_data
    from utils.logs import setup_logging

    setup_logging(level="INFO")
    strategy = make_strategy(num_replicas=args.replicas)
    total = args.epochs * args.steps_per_epoch
    num_examples = args.batch * args.steps_per_epoch
    features, labels = toy_data(num_examples)
    eval_x, eval_y = toy_data(37, seed=5)

    train_data_fn = make_train_data_fn(features, labels, args.batch,
                                       step_delay=args.step_delay, delay_from_epoch=args.delay_from_epoch)

    with strategy.scope():
        model = MLP()
    optimizer = SGD(StepDecay(0.1, total, decay_points=(0.5,), decay_rate=0.2),
                    momentum=0.9, nesterov=True, weight_decay=1e-3)
    trainer = Trainer(strategy, Classify(model), optimizer, global_batch_size=args.batch,
                      accum=args.accum)

    start = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    latest = tf.train.latest_checkpoint(os.path.join(args.train_path, "ckpt"))
    if args.resume and latest:
        for key in start:
            start[key] = int(tf.train.load_variable(latest, f"{key}/.ATTRIBUTES/VARIABLE_VALUE"))

    eval_data = tf.data.Dataset.from_tensor_slices((eval_x, eval_y)).batch(8)
    while args.start_file and not os.path.exists(args.start_file):
        time.sleep(0.01)
    logs = fit(trainer, train_data_fn, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
               train_path=args.train_path, eval_data=eval_data, resume=args.resume,
               ckpt_every_steps=args.ckpt_every, log_every_steps=2)

    np.savez(args.out + ".npz", *[v.numpy() for v in model.trainable_variables])
    result = {"logs": logs, "start": start,
              "global_step": int(trainer.global_step.numpy()),
              "iterations": int(optimizer.iterations.numpy())}
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
