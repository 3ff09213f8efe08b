"""CPU speed of the toolkit against Keras `model.fit` and PyTorch, same nets, same weights, one window.

For each net (`--archs`: ResNet-56, ResNet-20, MobileNetV2 on CIFAR by default) and each
implementation, one child process (fresh threads, nothing shared) measures:

* `toolkit`: a training step of the engine (`op_utils.trainer.Trainer`, SGD Nesterov + weight decay,
  batch 128, XLA off as `--compile auto` chooses on a CPU) and the compiled inference forward pass at
  batch 1 and 128: as a TensorFlow graph (XLA off), XLA-compiled (`jit_compile=True`), and frozen (the
  variables turned into constants, so that the graph optimiser folds the BN into the kernels once);
* `toolkit_bf16`: the same child with grappler's oneDNN bfloat16 rewrite on (`--precision bfloat16`);
* `toolkit_1t`: the same child's inference with one intra-op thread (`test.py --intra_op_threads 1`,
  set before the runtime starts), the single-image serving configuration;
* `fit`: the same architecture as a Keras 3 functional model trained by `model.fit`
  (`keras_resnet.py`, `keras_mobilenet.py`);
* `torch`: the same net with the same weights in PyTorch (`torch_nets.py`): a training step in NCHW and
  channels-last, and eager inference (`eval()`, `inference_mode`) at batch 1 and 128 in both layouts;
  skipped with a message when PyTorch is not installed (it is a dependency of this benchmark only);
* `torch_export`: PyTorch's deployable forms of that net (channels-last): TorchScript traced, frozen and
  `optimize_for_inference`d, and `torch.compile` (inductor), the peers of the TFLite file;
* `tflite`: the toolkit's exported float32 TFLite file (`codebase.tflite`) in LiteRT, batch 1 and 128.

The weights are made once (`params` child: the toolkit net at a fixed seed, or `--resnet56_params` for
ResNet-56) and saved with a reference batch and its logits; the PyTorch child checks its logits against
them, so "the same net" is measured, not assumed. The implementations run in `--rounds` interleaved
rounds (each round in the reverse order of the last), so slow drifts of the machine's load fall on
every column alike; each figure is the median over rounds of a child's median. `--slimmed` adds the
EKG-slimmed ResNet-56 at 45% of the FLOPs (the widths of section 6's seed 0; latency is a function of
the widths, so the weights are the seed's random ones) next to the unpruned one, with the widths padded
to multiples of 8 and 16 (`nets.pad_channels`), for the pruned-to-unpruned latency ratios.

    python benchmarks/cpu_speed.py --rounds 2 --out runs/cpu_speed            # everything, ~35 min here
    python benchmarks/cpu_speed.py --archs ResNet-20 --impls toolkit torch     # a subset
    python benchmarks/cpu_speed.py --child toolkit --arch ResNet-56 --out runs/cpu_speed  # one child

Writes `<out>/results.json` (every child's figures, the host, the load) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from common import ROOT, host, write_json

IMPLS = ("toolkit", "toolkit_bf16", "toolkit_1t", "fit", "torch", "torch_export", "tflite")
VARIANTS_OF = {"toolkit_bf16": ["--bf16"], "toolkit_1t": ["--intra_op", "1", "--no_train"]}  # the toolkit child's
ARCHS = ("ResNet-56", "ResNet-20", "MobileNetV2")
# Section 6's EKG ResNet-56 at 45% of the FLOPs, seed 0: stream widths, then each stage's block interiors.
EKG45 = {"stem": 15, "stage1": 31, "stage2": 64,
         **{f"BasicBlock{s}.{b}/conv1": w for s, row in enumerate(
             ((7, 4, 1, 4, 7, 1, 4, 1, 7), (26, 7, 7, 7, 7, 7, 13, 13, 15), (64, 39, 52, 52, 52, 64, 64, 39, 26)))
            for b, w in enumerate(row)}}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slimmed", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the EKG-slimmed ResNet-56 (45%% of the FLOPs) and its padded widths")
    p.add_argument("--resnet56_params", default=os.path.join(ROOT, "..", "shared", "data", "pretrained",
                                                             "res56_cifar10.pkl"),
                   help="weights of the unpruned ResNet-56 (random ones when the file is absent)")
    p.add_argument("--batch_size", type=int, default=128, help="training batch and the large inference batch")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps (the first traces)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps")
    p.add_argument("--latency_runs", type=int, default=40, help="timed batch-1 calls (a quarter at the large batch)")
    p.add_argument("--no_train", action="store_true", help="inference only")
    p.add_argument("--child_env", nargs="*", default=[], metavar="NAME=VALUE",
                   help="environment of the TensorFlow children (toolkit, fit, tflite): a lever, e.g. TF_NUM_INTEROP_THREADS=1")
    p.add_argument("--toolkit_flags", default="", help="extra flags of the toolkit child: --inter_op N, --intra_op N")
    p.add_argument("--out", default="runs/cpu_speed")
    # child mode
    p.add_argument("--child", choices=("params", "toolkit", "fit", "torch", "torch_export", "tflite"))
    p.add_argument("--arch")
    p.add_argument("--variant", default="full", help="full | ekg45 | ekg45_pad8 | ekg45_pad16")
    p.add_argument("--bf16", action="store_true", help="toolkit child: grappler's oneDNN bfloat16 rewrite")
    p.add_argument("--inter_op", type=int, default=0, help="toolkit child: inter-op threads (0: TF's default)")
    p.add_argument("--intra_op", type=int, default=0, help="toolkit child: intra-op threads (0: TF's default)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.latency_runs < 4 or args.batch_size < 2:
        p.error("--rounds, --steps must be positive, --latency_runs at least 4, --batch_size at least 2")
    if any("=" not in item for item in args.child_env):
        p.error("--child_env takes NAME=VALUE")
    return args


# === Shared by the children ======================================================================

def _params_file(args, arch: str, variant: str) -> str:
    return os.path.join(args.out, "params", f"{arch}_{variant.split('_pad')[0]}.npz")


def timed(call, runs: int) -> dict:
    """Median and minimum milliseconds of `runs` calls after two untimed ones."""
    call()
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def _train_rate(step, args) -> dict:
    """Images per second of training steps: the median step over `--steps` after `--warmup`."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"images_per_s": args.batch_size / statistics.median(times), "first_step_s": first}


def _batch(args, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, 32, 32, 3), dtype=np.float32),
            rng.integers(0, 10, size).astype(np.int64))


# === Children ====================================================================================

def _toolkit_net(args, arch: str, variant: str, strategy=None):
    """The toolkit net of `variant` with the weights of the params file (padded if the variant says so)."""
    import nets

    saved = np.load(_params_file(args, arch, variant))
    params = {k: saved[k] for k in saved.files if not k.startswith("__")}
    net = nets.build_from_params(arch, params)
    if "_pad" in variant:
        net = nets.pad_channels(net, int(variant.rsplit("_pad", 1)[1]))
    return net, saved


def _child_params(args) -> dict:
    """Make the weights of `--arch`/`--variant` once, with a reference batch and its inference logits."""
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    import nets
    from codebase.artifacts import load_net

    tf.random.set_seed(0)
    if args.arch == "ResNet-56" and args.variant == "full" and os.path.isfile(args.resnet56_params):
        net, source = load_net("ResNet-56", args.resnet56_params, num_classes=10, input_size=32), args.resnet56_params
    else:
        net = nets.build(args.arch, widths=EKG45 if args.variant == "ekg45" else None, masked=False)
        source = "random (seed 0)"
    images, _ = _batch(args, 8, seed=1)
    logits = net(tf.constant(images), training=False).numpy()
    path = _params_file(args, args.arch, args.variant)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", __images__=images, __logits__=logits, **net.get_params())
    os.replace(path + ".tmp.npz", path)
    return {"source": source, "macs": net.cost().macs, "flops": net.cost().ekg_flops}


def _child_toolkit(args) -> dict:
    sys.path.insert(0, ROOT)
    from op_utils.strategy import make_strategy
    from utils.devices import use_precision, use_thread_pools

    import tensorflow as tf

    use_thread_pools(args.intra_op, args.inter_op)  # as the scripts' --intra_op_threads: before the runtime starts
    strategy = make_strategy(None, 1)  # before any other TF op, as every script
    if args.bf16:
        use_precision("bfloat16")
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from op_utils.optim import SGD
    from op_utils.task import Classify
    from op_utils.trainer import Trainer

    with strategy.scope():
        net, saved = _toolkit_net(args, args.arch, args.variant)
    out = {"max_logit_diff": float(np.max(np.abs(net(tf.constant(saved["__images__"]), training=False).numpy()
                                                  - saved["__logits__"])))}
    graph = tf.function(lambda images: net(images, training=False))
    frozen = convert_variables_to_constants_v2(graph.get_concrete_function(tf.TensorSpec([None, 32, 32, 3])))
    forwards = {"graph": graph, "xla": tf.function(graph.python_function, jit_compile=True),
                "frozen": lambda images: frozen(images)[0]}
    for name, forward in forwards.items():
        for size in (1, args.batch_size):
            x = tf.constant(_batch(args, size)[0])
            out[f"{name}_b{size}"] = timed(lambda: forward(x).numpy(), _runs(args, size))
    if not args.no_train and args.variant == "full":
        with strategy.scope():
            optimizer = SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        trainer = Trainer(strategy, Classify(net), optimizer, global_batch_size=args.batch_size, xla=False)
        images, labels = _batch(args, args.batch_size)
        data = tf.data.Dataset.from_tensors((images, labels.astype(np.int32))).repeat()
        batches = iter(strategy.experimental_distribute_dataset(data))
        out["train"] = _train_rate(lambda: float(trainer.train_step(next(batches))["loss"]), args)
    return out


def _runs(args, size: int) -> int:
    return args.latency_runs if size == 1 else max(4, args.latency_runs // 4)


def _child_fit(args) -> dict:
    import tensorflow as tf

    import keras

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.arch.startswith("ResNet"):
        from keras_resnet import cifar_resnet

        model = cifar_resnet(int(args.arch.split("-")[1]))
    else:
        from keras_mobilenet import cifar_mobilenet_v2

        model = cifar_mobilenet_v2()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)
    images, labels = _batch(args, args.batch_size)
    data = tf.data.Dataset.from_tensors((images, labels.astype(np.int32))).repeat()
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            times.append(time.perf_counter() - self.start)

    model.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps, callbacks=[Clock()], verbose=0)
    return {"train": {"images_per_s": args.batch_size / statistics.median(times[args.warmup:]),
                      "first_step_s": times[0]}}


def _torch_start(args):
    """`(torch, build, saved params file, params, out)` of a PyTorch child, or the dict it returns
    when it has nothing to run (PyTorch absent, a padded variant)."""
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed (pip install torch==2.13.0)"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_nets import build

    if "_pad" in args.variant:
        return {"skipped": "padding is the toolkit's (PyTorch runs the net's own widths)"}
    saved = np.load(_params_file(args, args.arch, args.variant))
    params = {k: saved[k] for k in saved.files if not k.startswith("__")}
    return torch, build, saved, params, {"threads": torch.get_num_threads(), "torch": torch.__version__}


def _child_torch(args) -> dict:
    start = _torch_start(args)
    if isinstance(start, dict):
        return start
    torch, build, saved, params, out = start
    import torch.nn.functional as F

    for layout, memory_format in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        net = build(args.arch, params).to(memory_format=memory_format)
        net.eval()
        with torch.inference_mode():
            check = torch.from_numpy(saved["__images__"]).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
            out[f"max_logit_diff_{layout}"] = float(np.max(np.abs(net(check).numpy() - saved["__logits__"])))
            for size in (1, args.batch_size):
                x = torch.from_numpy(_batch(args, size)[0]).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
                out[f"eager_{layout}_b{size}"] = timed(lambda: net(x), _runs(args, size))
        if args.no_train or args.variant != "full":
            continue
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        images, labels = _batch(args, args.batch_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        y = torch.from_numpy(labels)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        out[f"train_{layout}"] = _train_rate(step, args)
    return out


def _child_torch_export(args) -> dict:
    """PyTorch's deployable forms of the same net, channels-last, beside the TFLite file: TorchScript
    (traced, frozen, `optimize_for_inference`) and `torch.compile` (inductor), each checked against
    the reference logits; a form that fails is reported with its error's last line."""
    start = _torch_start(args)
    if isinstance(start, dict):
        return start
    torch, build, saved, params, out = start
    net = build(args.arch, params).to(memory_format=torch.channels_last).eval()

    def nchw(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    check = nchw(saved["__images__"])
    makers = {"torchscript": lambda: torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, check))),
              "compile": lambda: torch.compile(net)}
    for name, make in makers.items():
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model = make()
                logits = model(check).numpy()
                out[f"{name}_first_call_s"] = time.perf_counter() - start
                out[f"max_logit_diff_{name}"] = float(np.max(np.abs(logits - saved["__logits__"])))
                for size in (1, args.batch_size):
                    x = nchw(_batch(args, size)[0])
                    out[f"{name}_b{size}"] = timed(lambda: model(x), _runs(args, size))
        except Exception as error:  # noqa: BLE001 (a form this PyTorch cannot build is a result)
            out[f"{name}_error"] = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
    return out


def _child_tflite(args) -> dict:
    sys.path.insert(0, ROOT)
    from op_utils.strategy import make_strategy

    make_strategy(None, 1)
    from codebase.export import deployable
    from codebase.tflite import Runner, convert

    net, saved = _toolkit_net(args, args.arch, args.variant)
    content = convert(deployable(net), "fp32")
    runner = Runner(content=content, num_threads=os.cpu_count())
    out = {"bytes": len(content),
           "max_logit_diff": float(np.max(np.abs(runner(saved["__images__"]) - saved["__logits__"])))}
    for size in (1, args.batch_size):
        x = _batch(args, size)[0]
        out[f"tflite_b{size}"] = timed(lambda: runner(x), _runs(args, size))
    return out


CHILDREN = {"params": _child_params, "toolkit": _child_toolkit, "fit": _child_fit, "torch": _child_torch,
            "torch_export": _child_torch_export, "tflite": _child_tflite}


# === Parent ======================================================================================

def _launch(args, child: str, arch: str, variant: str) -> dict:
    process = "toolkit" if child in VARIANTS_OF else child  # the same child with other flags
    cmd = [sys.executable, os.path.abspath(__file__), "--child", process, "--arch", arch, "--variant", variant,
           "--out", args.out, "--batch_size", str(args.batch_size), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--latency_runs", str(args.latency_runs),
           "--resnet56_params", args.resnet56_params, *(["--no_train"] if args.no_train else [])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    if not process.startswith("torch"):
        env.update(item.split("=", 1) for item in args.child_env)
    if process == "toolkit":
        cmd += [*args.toolkit_flags.split(), *VARIANTS_OF.get(child, [])]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: child {child} {arch} {variant} exited with {proc.returncode}: {tail}")
    result = json.loads(lines[-1])
    result.update(child=child, arch=arch, variant=variant, load_before=load, load_after=os.getloadavg()[0],
                  time=time.strftime("%H:%M:%S"))
    print(f"{result['time']} {child:8s} {arch:12s} {variant:12s} load {load:.2f}: "
          f"{json.dumps({k: v for k, v in result.items() if k not in ('child', 'arch', 'variant', 'time')})[:300]}",
          file=sys.stderr, flush=True)
    return result


def _jobs(args) -> list:
    jobs = [(impl, arch, "full") for arch in args.archs for impl in args.impls]
    if args.slimmed and "ResNet-56" in args.archs:
        for variant in ("ekg45", "ekg45_pad8", "ekg45_pad16"):
            jobs += [(impl, "ResNet-56", variant) for impl in args.impls
                     if impl in ("toolkit", *VARIANTS_OF, "tflite") or (impl.startswith("torch") and "_pad" not in variant)]
    return jobs


def _median(runs: list, *keys) -> float | None:
    values = []
    for run in runs:
        value = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def tables(saved: dict, batch: int) -> str:
    """Markdown: training images/s, then latency (median over rounds of each child's median)."""
    def get(child, arch, variant, *keys):
        return _median([r for r in saved["runs"] if (r["child"], r["arch"], r["variant"]) == (child, arch, variant)],
                       *keys)

    def fmt(value, spec=".1f"):
        return "-" if value is None else format(value, spec)

    archs = list(dict.fromkeys(r["arch"] for r in saved["runs"]))
    lines = ["| net | toolkit | toolkit bfloat16 | model.fit | PyTorch NCHW | PyTorch channels-last | "
             "toolkit / best PyTorch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arch in archs:
        ours = get("toolkit", arch, "full", "train", "images_per_s")
        torch_best = max([v for v in (get("torch", arch, "full", f"train_{l}", "images_per_s") for l in ("nchw", "cl"))
                          if v is not None], default=None)
        lines.append(f"| {arch} | {fmt(ours)} | {fmt(get('toolkit_bf16', arch, 'full', 'train', 'images_per_s'))} | "
                     f"{fmt(get('fit', arch, 'full', 'train', 'images_per_s'))} | "
                     f"{fmt(get('torch', arch, 'full', 'train_nchw', 'images_per_s'))} | "
                     f"{fmt(get('torch', arch, 'full', 'train_cl', 'images_per_s'))} | "
                     f"{fmt(ours / torch_best if ours and torch_best else None, '.2f')} |")
    columns = (("TF graph", "toolkit", "graph"), ("TF frozen", "toolkit", "frozen"), ("TF XLA", "toolkit", "xla"),
               ("TF graph bfloat16", "toolkit_bf16", "graph"), ("TF graph 1 thread", "toolkit_1t", "graph"),
               ("TF XLA 1 thread", "toolkit_1t", "xla"), ("TFLite", "tflite", "tflite"),
               ("PyTorch TorchScript", "torch_export", "torchscript"), ("PyTorch torch.compile", "torch_export", "compile"),
               ("PyTorch eager NCHW", "torch", "eager_nchw"), ("PyTorch eager channels-last", "torch", "eager_cl"))
    lines += ["", "| net | batch | " + " | ".join(c[0] for c in columns) + " |",
              "|---|---:|" + "---:|" * len(columns)]
    variants = [("full", a) for a in archs] + [(v, "ResNet-56") for v in ("ekg45", "ekg45_pad8", "ekg45_pad16")]
    for variant, arch in variants:
        if not any((r["arch"], r["variant"]) == (arch, variant) for r in saved["runs"]):
            continue
        for size in (1, batch):
            cells = [fmt(get(child, arch, variant, f"{key}_b{size}", "median_ms"), ".2f") for _, child, key in columns]
            lines.append(f"| {arch} {variant} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        if not args.arch:
            raise SystemExit("error: --child needs --arch")
        print(json.dumps(CHILDREN[args.child](args)), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    saved = {"host": host(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
             "load_before": os.getloadavg(), "options": {k: v for k, v in vars(args).items() if k != "child"},
             "params": {}, "runs": []}
    jobs = _jobs(args)
    for arch, variant in dict.fromkeys((a, v.split("_pad")[0]) for _, a, v in jobs):
        saved["params"][f"{arch}_{variant}"] = _launch(args, "params", arch, variant)
    path = os.path.join(args.out, "results.json")
    for round_ in range(args.rounds):
        for job in (jobs if round_ % 2 == 0 else jobs[::-1]):
            saved["runs"].append(dict(_launch(args, *job), round=round_))
            write_json(path, saved)
    saved["load_after"] = os.getloadavg()
    write_json(path, saved)
    print(f"{saved['host']}; load {saved['load_before'][0]:.2f} -> {saved['load_after'][0]:.2f}")
    print(tables(saved, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
