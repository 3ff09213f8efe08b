"""EKG against its baselines on real CIFAR-10, from the reference ResNet-56 (issue: EKG proof).

For every seed, each method is a run of the toolkit's own scripts, in its own process:

* ``ekg``: ``train_cifar.py --method ekg`` in two processes: the first stops after the search
  (``--stop_after search``) so the warm-up + search time and the peak memory of a search
  process are measured on their own; the second (``--resume``) builds the memory bank,
  fine-tunes with memory-bank KD and tests.
* ``ekg_ce``: the same searched and slimmed net (``slimmed_params.pkl`` of the ``ekg`` run),
  fine-tuned with plain cross-entropy by ``--method none`` and the same flags and budget.
* ``l1`` / ``random``: ``--method l1`` / ``--method random`` to the same FLOPs target, fine-tuned
  with plain cross-entropy and the same budget.
* ``resrep``: ``--method resrep`` to the same target: ``--resrep_epochs`` epochs of training with
  compactors and the Res update (schedule compressed, see ``RESREP``), conversion, then the same
  fine-tuning budget as the others.
* ``resrep_ft`` / ``l1_ft``: ResRep given EKG's wall-clock: the converted net of the ``resrep`` run
  (``slimmed_params.pkl``) fine-tuned by ``--method none`` for ``--long_finetune_epochs`` epochs; and
  the ``l1`` run's pruned net given the same fine-tuning.
* ``cp`` / ``cpr``: ``--method cp`` / ``--method cpr`` (PocketFlow's LASSO channel pruning and its
  remastered variant) to the same target, sampling ``--cp_batches`` batches of 128 training images per
  group, then the same fine-tuning budget. ``cpr_converged``: ``cpr`` with ISTA run to convergence
  (``--cpr_ista_lr 1 --cpr_ista_iters 300``; PocketFlow's 100 steps of 1e-2 barely leave the random start).
* ``dcp``: ``--method dcp`` (discrimination-aware channel pruning) to the same target on a budget that
  fits here: ``--dcp_block_steps`` block-wise steps per stage, ``--dcp_layer_steps`` per choice of
  ``--dcp_chunk`` channels (PocketFlow: 10,000, 500 and 1), then the same fine-tuning budget.
* ``ekg_ce_ft``: the ``ekg`` run's slimmed net given that same long plain-CE fine-tuning, so that the
  sub-networks of EKG and L1 are compared at the long budget too.

All fine-tunings use EKG's preset (lr 0.01, x0.2 at 30/60/80% of training, weight decay 5e-4,
batch 128) over ``--finetune_epochs`` epochs. Test accuracy is on the test images of
``--data_path`` with moving statistics; "before" is right after slimming with BN statistics
re-estimated on training images (never test images). For calibration against the reference
implementation, the EKG slimmed net is also evaluated on the test images with batch
statistics (batches of 256, the reference's number).

Usage (from the repository root; about 25 minutes per seed on 2 cores)::

    python benchmarks/ekg_cifar.py --data_path ../shared/data/cifar-10-batches-py \\
        --trained_param ../shared/data/pretrained/res56_cifar10.pkl --seeds 0 1 2 --out runs/ekg_bench

Writes ``<out>/results.json`` (one entry per run, updated after every run; an existing entry
is kept, so an interrupted benchmark continues where it stopped) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = ["--learning_rate", "0.01", "--weight_decay", "5e-4", "--decay_points", "0.3", "0.6", "0.8",
            "--decay_rate", "0.2", "--batch_size", "128", "--val_batch_size", "256"]
# ResRep's schedule compressed from 480 epochs into `--resrep_epochs` (issue: ResRep proof): the
# paper's internal layers only, masks from half an epoch on, every 2 steps up to 16 rows more, and
# a lasso strong enough (`--resrep_lambda`) for masked rows to decay within the short run.
RESREP = ["--no-resrep_streams", "--resrep_before_mask", "0.5", "--resrep_interval", "2",
          "--resrep_granularity", "16"]
METHODS = ("ekg", "ekg_ce", "l1", "random", "resrep", "resrep_ft", "l1_ft", "ekg_ce_ft", "cp", "cpr", "cpr_converged",
           "dcp")


def run_child(argv: list, log_path: str) -> dict:
    """Run `python <argv>` from the repository root; wall seconds, peak RSS (MB) and exit code."""
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    tic = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: {' '.join(argv[:3])} ... exited with {code}; see {log_path}")
    return {"wall": time.perf_counter() - tic, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu": usage.ru_utime + usage.ru_stime}


def epoch_evals(run: str, stage: str) -> list:
    """Test top-1 after each epoch of `stage`, read from the run's log.txt."""
    evals, current = [], None
    with open(os.path.join(run, "log.txt")) as f:
        for line in f:
            found = re.search(r"codebase\.pipeline: stage (\S+)$", line.strip())
            if found:
                current = found.group(1).split("/")[-1]
            found = re.search(r"op_utils\.loop: epoch \d+/\d+: .*eval_top1=([0-9.]+)", line)
            if found and current == stage:
                evals.append(float(found.group(1)))
    return evals


def read(run: str, name: str) -> dict:
    path = os.path.join(run, name)
    return json.load(open(path)) if os.path.exists(path) else {}


def step_dir(run: str) -> str:
    """The folder of a run's (single) method step: `<run>/1-<method>`."""
    return next(os.path.join(run, d) for d in sorted(os.listdir(run)) if d.startswith("1-"))


def stage_time(timings: dict, stage: str) -> float:
    """Seconds of a stage, whatever the step folder it ran in (`1-ekg/search`)."""
    return sum(v for k, v in timings.items() if k.split("/")[-1] == stage)


def batch_stat_top1(params: str, data_path: str, batch: int = 256) -> float:
    """Test top-1 of a slimmed net with BN batch statistics (the reference's post-search number)."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, _ROOT)
    from codebase.artifacts import load_net
    from dataloader import build_dataset

    data = build_dataset("cifar10", data_path)
    net = load_net("ResNet-56", params, num_classes=10, input_size=32)
    forward = tf.function(lambda x: net(x, training=True))  # a throw-away copy: its stats may move
    correct = total = 0
    for images, labels in data.test(batch):
        correct += int(np.sum(np.argmax(forward(images).numpy(), -1) == labels.numpy()))
        total += int(labels.shape[0])
    return correct / total


def one_run(method: str, seed: int, args, out: str) -> dict:
    run = os.path.join(out, f"{method}_seed{seed}")
    log = os.path.join(out, f"{method}_seed{seed}.stdout")
    common = ["--arch", "ResNet-56", "--dataset", "cifar10", "--data_path", args.data_path, "--train_path", run,
              "--seed", str(seed), "--do_log", "10", "--train_epoch", str(args.finetune_epochs),
              *(["--recompute"] if args.recompute else []), *FINETUNE]
    # Each method takes only its own options (a flag of another method is an error).
    target = ["--search_target_rate", str(args.target)]
    search = [*target, "--search_round_to", str(args.round_to),
              *(["--search_cache_mb", str(args.cache_mb)] if args.cache_mb else [])]
    entry = {"method": method, "seed": seed, "run": run}
    if method == "ekg":
        searched = run_child(["train_cifar.py", "--method", "ekg", "--trained_param", args.trained_param, *common,
                              *search, "--stop_after", "search"], log)
        rest = run_child(["train_cifar.py", "--method", "ekg", "--trained_param", args.trained_param, *common, *search,
                          "--resume"], log)
        entry.update(search_process=searched, rest_process=rest, wall=searched["wall"] + rest["wall"],
                     before_top1_batch_stats=batch_stat_top1(os.path.join(step_dir(run), "slimmed_params.pkl"),
                                                             args.data_path))
        stage = "finetune"
    elif method in ("ekg_ce", "resrep_ft", "l1_ft", "ekg_ce_ft"):
        source = os.path.join(out, f"{method.split('_')[0]}_seed{seed}")
        if method.endswith("_ft"):
            common[common.index("--train_epoch") + 1] = str(args.long_finetune_epochs)
        proc = run_child(["train_cifar.py", "--method", "none", "--trained_param",
                          os.path.join(step_dir(source), "slimmed_params.pkl"), *common], log)
        pruned = read(step_dir(source), "prune_results.json")
        entry.update(process=proc, wall=proc["wall"], before_finetune_top1=pruned["before_finetune_top1"],
                     widths=pruned["widths"], flops_rate=pruned["flops_rate"])
        if method.endswith("_ft"):  # the source run up to its pruned net, then this fine-tuning
            timings = read(source, "timings.json")
            entry["wall"] += sum(stage_time(timings, k) for k in ("resrep", "convert", "prune", "warmup", "search"))
        stage = "train"
    else:
        extra = target
        if method.startswith("cp"):  # the sampled images: --cp_batches batches of 128
            extra = [*target, "--search_batch_size", "128", "--cp_batches", str(args.cp_batches)]
        if method == "cpr_converged":  # ISTA run to convergence instead of PocketFlow's 100 steps of 1e-2
            method, extra = "cpr", [*extra, "--cpr_ista_lr", "1", "--cpr_ista_iters", "300"]
        if method == "dcp":  # PocketFlow's algorithm on a budget: short fine-tunings, channels added 4 at a time
            extra = [*target, "--search_batch_size", "128", "--dcp_block_steps", str(args.dcp_block_steps),
                     "--dcp_layer_steps", str(args.dcp_layer_steps), "--dcp_chunk", str(args.dcp_chunk)]
        if method == "resrep":
            extra = [*RESREP, "--resrep_target", str(args.target), "--resrep_epoch", str(args.resrep_epochs),
                     "--resrep_lambda", str(args.resrep_lambda)]
        proc = run_child(["train_cifar.py", "--method", method, "--trained_param", args.trained_param, *common,
                          *extra], log)
        entry.update(process=proc, wall=proc["wall"])
        stage = "finetune"
    results, pruned = read(run, "results.json"), read(step_dir(run), "prune_results.json")
    entry.update({k: v for k, v in {**pruned, **results}.items() if not isinstance(v, (list, dict)) or k == "widths"})
    entry.update(timings=read(run, "timings.json"), epoch_top1=epoch_evals(run, stage))
    return entry


def latency(args, out: str, params: str, batch: int, pad_to: int = 1) -> dict:
    """test.py --json on one params pickle at one batch size (CPU latency, one replica)."""
    log = os.path.join(out, "latency.stdout")
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "test.py", "--arch", "ResNet-56", "--data_path", args.data_path,
                           "--trained_param", params, "--json", "--batch_size", str(batch), "--latency_runs",
                           str(args.latency_runs), "--pad_to", str(pad_to)], cwd=_ROOT, env=env,
                          capture_output=True, text=True, check=True)
    with open(log, "a") as f:
        f.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(entries: list) -> str:
    rows = ["| method | seed | warm-up + search (s) | search peak RSS (MB) | FLOPs (EKG) | rate | params | MACs "
            "| top-1 before FT | top-1 per FT epoch | top-1 after FT | run wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for e in entries:
        t = e.get("timings", {})
        search = stage_time(t, "warmup") + stage_time(t, "search") if e["method"] == "ekg" else None
        rss = e.get("search_process", {}).get("peak_rss_mb")
        flops = e.get("ekg_flops") or e.get("slimmed_ekg_flops")
        rows.append(
            f"| {e['method']} | {e['seed']} | {f'{search:.0f}' if search else '-'} | {f'{rss:.0f}' if rss else '-'} "
            f"| {flops / 1e6:.2f} M | {e.get('flops_rate', 0):.4f} | {e.get('params', 0) / 1e6:.3f} M "
            f"| {e.get('macs', 0) / 1e6:.2f} M | {e['before_finetune_top1'] * 100:.2f} "
            f"| {' / '.join(f'{v * 100:.2f}' for v in e['epoch_top1'])} | {e['top1'] * 100:.2f} | {e['wall']:.0f} |")
    return "\n".join(rows)


def percent_mean_sd(fractions) -> str:
    """`"mean +- sd"` in percent (sample sd; 0 for one value)."""
    values = [100 * v for v in fractions]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def summary(entries: list) -> str:
    rows = ["| method | runs | top-1 before FT (mean +- sd) | top-1 after FT (mean +- sd) | FLOPs rate (mean) |",
            "|---|---:|---:|---:|---:|"]
    for method in METHODS:
        group = [e for e in entries if e["method"] == method]
        if not group:
            continue
        rows.append(f"| {method} | {len(group)} | {percent_mean_sd([e['before_finetune_top1'] for e in group])} "
                    f"| {percent_mean_sd([e['top1'] for e in group])} | {statistics.mean(e['flops_rate'] for e in group):.4f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--trained_param", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--round_to", type=int, default=1,
                        help="EKG: --search_round_to (1 = the paper's widths; 8 = multiples of 8)")
    parser.add_argument("--recompute", action="store_true", help="train with --recompute (less memory)")
    parser.add_argument("--cache_mb", type=int, default=None, help="EKG: --search_cache_mb (default: the toolkit's)")
    parser.add_argument("--resrep_epochs", type=int, default=4, help="ResRep: epochs with compactors")
    parser.add_argument("--resrep_lambda", type=float, default=3e-3, help="ResRep: lasso strength")
    parser.add_argument("--long_finetune_epochs", type=int, default=20,
                        help="resrep_ft, l1_ft, ekg_ce_ft: fine-tuning epochs")
    parser.add_argument("--cp_batches", type=int, default=4,
                        help="cp / cpr: batches of 128 training images sampled per group (PocketFlow: 30)")
    parser.add_argument("--dcp_block_steps", type=int, default=40,
                        help="dcp: block-wise fine-tuning steps per stage (PocketFlow: 10,000)")
    parser.add_argument("--dcp_layer_steps", type=int, default=10,
                        help="dcp: layer-wise fine-tuning steps per choice (PocketFlow: 500)")
    parser.add_argument("--dcp_chunk", type=int, default=4, help="dcp: channels added per choice (PocketFlow: 1)")
    parser.add_argument("--latency_runs", type=int, default=20)
    parser.add_argument("--out", default="runs/ekg_bench")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    saved = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    for seed in args.seeds:
        for method in args.methods:
            if any(e["method"] == method and e["seed"] == seed for e in saved["runs"]):
                continue
            load = os.getloadavg()
            print(f"{time.strftime('%H:%M:%S')} {method} seed {seed} (load {load[0]:.2f})", flush=True)
            entry = one_run(method, seed, args, args.out)
            entry["load_before"] = load
            entry["load_after"] = os.getloadavg()
            saved["runs"].append(entry)
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
            print(table([entry]).splitlines()[-1], flush=True)
    ekg = [e for e in saved["runs"] if e["method"] == "ekg"]
    if ekg and "latency" not in saved:
        final = os.path.join(ekg[0]["run"], "trained_params.pkl")
        # The slimmed net also with its widths padded to multiples of 8 (same outputs, see nets.pad_channels).
        variants = (("unpruned", args.trained_param, 1), ("ekg", final, 1), ("ekg pad8", final, 8))
        saved["latency"] = {f"{name} batch {b}": latency(args, args.out, p, b, pad)["latency_ms"]
                            for b in (1, 128) for name, p, pad in variants}
        with open(path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(path + ".tmp", path)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}")
    print(table(saved["runs"]))
    print()
    print(summary(saved["runs"]))
    for e in ekg:
        print(f"ekg seed {e['seed']}: before FT with batch statistics {e['before_top1_batch_stats'] * 100:.2f}%, "
              f"search steps {e.get('search_steps')}, trace count {e.get('trace_count')}, widths {e.get('widths')}")
    if "latency" in saved:
        print("latency (ms, CPU):", json.dumps(saved["latency"]))


if __name__ == "__main__":
    main()
