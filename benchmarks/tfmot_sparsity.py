"""Peer baseline for weight sparsity: TF-MOT's `prune_low_magnitude` on the option-A CIFAR ResNets.

Purpose
-------
TensorFlow Model Optimization (TF-MOT 0.8.1) is the reference tool for magnitude pruning on
TensorFlow, but it only works on `tf_keras` (Keras 2) models, so it cannot prune the
toolkit's Keras 3 nets. This script rebuilds the option-A CIFAR ResNet-20/56 as a `tf_keras`
functional model (`../shared/data/README.md`, section "pretrained/option_a"), loads the
PyTorch weights, checks their top-1 on the 1,017 test images (91.64% / 92.72%), and then, for
each target sparsity and seed, fine-tunes with TF-MOT on the budget of the toolkit's `ws`
run:

* every Conv2D and Dense layer wrapped by `prune_low_magnitude` (first and last included),
  `PolynomialDecay(0 -> s, begin_step=ceil(0.1 T), end_step=floor(0.5 T), power=3,
  frequency=10)`, T = epochs x steps per epoch, `UpdatePruningStep` callback;
* 4 epochs of 39 steps (batch 128, drop_remainder, 5,085 training images), SGD Nesterov
  momentum 0.9, learning rate 0.01 x 0.2 from steps int(0.3 T), int(0.6 T), int(0.8 T)
  (the toolkit's `StepDecay`), L2 weight decay 5e-4 on the gradient of every trainable
  variable (`l2(2.5e-4)` regularizers on conv/dense kernels, dense bias, BN gamma and beta);
* per-image augmentation on the normalised image, as the toolkit's `dataloader/cifar.py`:
  random horizontal flip, reflect-pad 4, random 32x32 crop; shuffled every epoch. Order and
  augmentation are seeded like the toolkit's `dataloader/seeds.py` (SeedSequence epoch keys,
  stateless ops), but the script does not import the toolkit.

Then `strip_pruning`, top-1 of the Keras model, measured sparsity of the conv/dense kernels,
TFLite fp32 conversion (plain, and with `optimizations=[tf.lite.Optimize.EXPERIMENTAL_SPARSITY]`),
both files' bytes and gzip -9 bytes (TF-MOT's size convention), and the top-1 of both files
through the LiteRT interpreter. One `pretrained` row per arch gives the dense reference.

Set-up (a separate environment outside the repository; TF-MOT must not touch the toolkit's)
------------------------------------------------------------------------------------------
`tf_keras==2.21.0` depends on the full `tensorflow` wheel, which would be installed next to
`tensorflow-cpu`; `--no-deps` avoids it. The venv sees the system tensorflow-cpu 2.21.0,
numpy, scipy, absl-py, six and ai-edge-litert::

    python3 -m venv --system-site-packages /work/venv-tfmot
    /work/venv-tfmot/bin/pip install --no-deps tf_keras==2.21.0 tensorflow-model-optimization==0.8.1

TF-MOT also declares `dm-tree` and `mock`; neither is imported by `tfmot.sparsity` (only
`dm-tree` by the tensor-encoding code), so they are not installed. `TF_USE_LEGACY_KERAS=1`
is not needed: TF-MOT sets it itself when imported and imports `tf_keras` directly; this
script sets it too (before importing TensorFlow) so that `tf.keras` is the same Keras.

Usage (from the repository root; on 2 shared cores about 2.5 min per ResNet-20 run, 6 min per ResNet-56 run)
-----------------------------------------------------------------------------------------------------------
::

    /work/venv-tfmot/bin/python benchmarks/tfmot_sparsity.py --archs ResNet-20 --seeds 0 1 2
    /work/venv-tfmot/bin/python benchmarks/tfmot_sparsity.py --archs ResNet-56 --seeds 0
    /work/venv-tfmot/bin/python benchmarks/tfmot_sparsity.py --table-only   # print the table

Results go to `--out/results.json` (default /work/bench/tfmot), a list of rows rewritten
atomically after every run; rows already there are skipped, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data"))

DEPTH = {"ResNet-20": 20, "ResNet-56": 56}
EXPECTED_TOP1 = {"ResNet-20": 0.9164, "ResNet-56": 0.9272}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
BN_EPS = 1e-5
BN_MOMENTUM = 0.9
PAD = 4
# keras l2(c) adds c * sum(w^2) to the loss, whose gradient is 2c * w = 5e-4 * w.
WEIGHT_DECAY = 5e-4
LR = 0.01
DECAY_POINTS = (0.3, 0.6, 0.8)
DECAY_RATE = 0.2
SPARSITY_BEGIN, SPARSITY_END, SPARSITY_POWER, SPARSITY_FREQUENCY = 0.1, 0.5, 3, 10


# ----- data -------------------------------------------------------------------------------
def load_cifar(folder):
    """(train images, train labels, test images, test labels); uint8 NHWC RGB, int32 labels."""

    def read(names):
        images, labels = [], []
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], np.int32))
        return np.concatenate(images), np.concatenate(labels)

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    return (*train, *test)


def normalise(images):
    """uint8 RGB -> float32, /255, ImageNet mean and std (works on numpy and tf tensors)."""
    return (tf.cast(images, tf.float32) / 255.0 - MEAN) / STD


def epoch_key(seed, epoch):
    """The toolkit's `dataloader.seeds.epoch_key`: a SeedSequence hash of (seed, epoch)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(epoch) % 2**64]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def train_stream(images, labels, batch, epochs, seed):
    """All `epochs` of shuffled, augmented batches as one finite dataset (epochs x steps batches).

    Each epoch is a fresh permutation cut to a multiple of `batch` (drop_remainder); each
    example's flip and crop are seeded by (epoch key, example index), as in the toolkit.
    """
    usable = (len(labels) // batch) * batch
    orders, keys = [], []
    for epoch in range(epochs):
        key = epoch_key(seed, epoch)
        rng = np.random.Generator(np.random.PCG64(key))
        orders.append(rng.permutation(len(labels))[:usable])
        keys.append(np.full(usable, key, np.int64))
    order, key = np.concatenate(orders), np.concatenate(keys)
    ds = tf.data.Dataset.from_tensor_slices((images[order], labels[order], key, order.astype(np.int64)))

    def one(image, label, key, index):
        seeds = tf.random.experimental.stateless_split(tf.stack([key, index]), num=2)
        image = normalise(image)
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
        image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, (32, 32, 3), seeds[1])
        return image, label

    ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# ----- model ------------------------------------------------------------------------------
class OptionAShortcut(keras.layers.Layer):
    """Parameter-free option-A shortcut: even rows and columns, zero channels on both sides."""

    def __init__(self, pad_channels, **kwargs):
        super().__init__(**kwargs)
        self.pad_channels = int(pad_channels)

    def call(self, x):
        p = self.pad_channels
        return tf.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [p, p]])

    def get_config(self):
        return {**super().get_config(), "pad_channels": self.pad_channels}


def build_resnet(depth):
    """The option-A CIFAR ResNet-`depth` as a tf_keras functional model, PyTorch-style padding.

    Layer names are the PyTorch keys with `.` -> `_` (`conv1`, `layer2_0_bn1`, `linear`).
    """
    n = (depth - 2) // 6
    reg = keras.regularizers.l2(WEIGHT_DECAY / 2)

    def conv(x, planes, stride, name):
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        return keras.layers.Conv2D(planes, 3, strides=stride, padding="valid", use_bias=False,
                                   kernel_regularizer=reg, name=name)(x)

    def bn(x, name):
        return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, gamma_regularizer=reg,
                                               beta_regularizer=reg, name=name)(x)

    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.ReLU(name="relu1")(bn(conv(inputs, 16, 1, "conv1"), "bn1"))
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64), start=1):
        for block in range(n):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"layer{stage}_{block}"
            y = keras.layers.ReLU(name=f"{name}_relu1")(bn(conv(x, planes, stride, f"{name}_conv1"), f"{name}_bn1"))
            y = bn(conv(y, planes, 1, f"{name}_conv2"), f"{name}_bn2")
            shortcut = x
            if stride != 1 or in_planes != planes:
                shortcut = OptionAShortcut(planes // 4, name=f"{name}_shortcut")(x)
            x = keras.layers.ReLU(name=f"{name}_relu2")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))
            in_planes = planes
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, kernel_regularizer=reg, bias_regularizer=reg, name="linear")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}_option_a")


def load_weights(model, path):
    """Copies the PyTorch `.npz` into `model`; every key must be used exactly once."""
    with np.load(path, allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    used = set()

    def take(key):
        used.add(key)
        return weights[key]

    for layer in model.layers:
        key = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([take(f"{key}.weight").transpose(2, 3, 1, 0)])  # OIHW -> HWIO
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([take(f"{key}.{n}") for n in ("weight", "bias", "running_mean", "running_var")])
        elif isinstance(layer, keras.layers.Dense):
            layer.set_weights([take(f"{key}.weight").T, take(f"{key}.bias")])  # [out, in] -> [in, out]
    unused = set(weights) - used - {k for k in weights if k.endswith("num_batches_tracked")}
    if unused:
        raise ValueError(f"{path}: keys not loaded: {sorted(unused)[:5]}")


def pretrained(arch, weights_dir):
    model = build_resnet(DEPTH[arch])
    load_weights(model, os.path.join(weights_dir, f"resnet{DEPTH[arch]}_cifar10_option_a.npz"))
    return model


# ----- measurements -----------------------------------------------------------------------
def keras_top1(model, images, labels, batch=256):
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(normalise(images[i:i + batch]), training=False)
        correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == labels[i:i + batch]))
    return correct / len(labels)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai_edge_litert"
    except ImportError:
        return tf.lite.Interpreter, "tf.lite"


def tflite_top1(content, images, labels, batch=128):
    interpreter_class, _ = _interpreter_class()
    interpreter = interpreter_class(model_content=content)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    correct, size = 0, None
    for i in range(0, len(labels), batch):
        x = normalise(images[i:i + batch]).numpy()
        if x.shape[0] != size:
            size = x.shape[0]
            interpreter.resize_tensor_input(inp, list(x.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        correct += int(np.sum(np.argmax(interpreter.get_tensor(out), axis=1) == labels[i:i + batch]))
    return correct / len(labels)


def to_tflite(model, sparse):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return converter.convert()


def kernel_sparsity(model):
    """(overall zero fraction, per-layer min, per-layer max) over the Conv2D and Dense kernels."""
    zeros = total = 0
    per_layer = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            w = layer.kernel.numpy()
            z = int(np.sum(w == 0))
            zeros, total = zeros + z, total + w.size
            per_layer.append(z / w.size)
    return zeros / total, min(per_layer), max(per_layer)


def measure(model, test_images, test_labels):
    """Keras top-1, sparsity, and both TFLite files' bytes, gzip bytes and top-1."""
    row = {"top1": keras_top1(model, test_images, test_labels)}
    row["measured_sparsity"], row["layer_sparsity_min"], row["layer_sparsity_max"] = kernel_sparsity(model)
    for prefix, sparse in (("tflite", False), ("sparse_tflite", True)):
        content = to_tflite(model, sparse)
        row[f"{prefix}_bytes"] = len(content)
        row[f"{prefix}_gzip_bytes"] = len(gzip.compress(content, compresslevel=9, mtime=0))
        row[f"{prefix}_top1"] = tflite_top1(content, test_images, test_labels)
    return row


def host_info():
    model_name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model_name in ("unknown", "x86_64", ""):
                    model_name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
    return {"cpu": model_name, "simd": simd, "cpu_count": os.cpu_count(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "tensorflow": tf.__version__, "tf_keras": keras.__version__,
            "tfmot": tfmot.__version__, "interpreter": _interpreter_class()[1]}


# ----- fine-tuning ------------------------------------------------------------------------
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """base x rate^k, k = number of boundaries int(p * total) reached by the (0-based) step."""

    def __init__(self, base, boundaries, rate):
        self.base, self.boundaries, self.rate = float(base), [int(b) for b in boundaries], float(rate)

    def __call__(self, step):
        passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries])
        return self.base * tf.pow(self.rate, passed)

    def get_config(self):
        return {"base": self.base, "boundaries": self.boundaries, "rate": self.rate}


def finetune(arch, sparsity, seed, args, data):
    """One TF-MOT run; returns (stripped model, fine-tuning wall seconds, schedule facts)."""
    train_images, train_labels = data[0], data[1]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    steps = len(train_labels) // args.batch
    total = args.epochs * steps
    t_b, t_e = math.ceil(SPARSITY_BEGIN * total), math.floor(SPARSITY_END * total)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=sparsity,
                                                    begin_step=t_b, end_step=t_e, power=SPARSITY_POWER,
                                                    frequency=SPARSITY_FREQUENCY)
    base = pretrained(arch, args.weights)

    def wrap(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer  # shared with `base`, weights included

    model = keras.models.clone_model(base, clone_function=wrap)
    wrapped = sum(type(layer).__name__ == "PruneLowMagnitude" for layer in model.layers)
    boundaries = [int(p * total) for p in DECAY_POINTS]
    optimizer = keras.optimizers.SGD(StepDecay(LR, boundaries, DECAY_RATE), momentum=0.9, nesterov=True)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    # The wrappers hold the loaded layers themselves: before fine-tuning this is the pretrained top-1.
    top1_before = keras_top1(model, data[2], data[3])
    ds = train_stream(train_images, train_labels, args.batch, args.epochs, seed)
    start = time.perf_counter()
    model.fit(ds, epochs=args.epochs, steps_per_epoch=steps, verbose=2,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    wall = time.perf_counter() - start
    facts = {"epochs": args.epochs, "batch": args.batch, "steps": total, "begin_step": t_b, "end_step": t_e,
             "lr_boundaries": boundaries, "wrapped_layers": wrapped, "top1_before_finetune": top1_before, "regularization_losses": len(model.losses)}
    return tfmot.sparsity.keras.strip_pruning(model), wall, facts


# ----- results ----------------------------------------------------------------------------
def row_key(row):
    return (row["kind"], row["arch"], row["sparsity"], row["seed"], row.get("epochs"), row.get("batch"))


def save(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".results.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def table(rows):
    def mean_sd(values, fmt):
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

    lines = ["| arch | target sparsity | seeds | top-1 % | TFLite top-1 % | measured sparsity % | .tflite B | "
             ".tflite gzip B | sparse .tflite B | sparse gzip B | fine-tune wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for row in rows:
        groups.setdefault((row["arch"], row["kind"], row["sparsity"]), []).append(row)
    for (arch, kind, sparsity), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        col = lambda k, scale=1.0: [r[k] * scale for r in group]  # noqa: E731
        lines.append("| " + " | ".join([
            arch, "dense (pretrained)" if kind == "pretrained" else f"{sparsity:.2f}",
            "-" if kind == "pretrained" else ",".join(str(r["seed"]) for r in group),
            mean_sd(col("top1", 100), "{:.2f}"), mean_sd(col("tflite_top1", 100), "{:.2f}"),
            mean_sd(col("measured_sparsity", 100), "{:.2f}"), mean_sd(col("tflite_bytes"), "{:,.0f}"),
            mean_sd(col("tflite_gzip_bytes"), "{:,.0f}"), mean_sd(col("sparse_tflite_bytes"), "{:,.0f}"),
            mean_sd(col("sparse_tflite_gzip_bytes"), "{:,.0f}"),
            "-" if kind == "pretrained" else mean_sd(col("wall_seconds"), "{:.0f}")]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(DEPTH), choices=list(DEPTH))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data_path", default=os.path.join(_SHARED, "cifar-10-batches-py"))
    parser.add_argument("--weights", default=os.path.join(_SHARED, "pretrained", "option_a"),
                        help="folder of resnet{depth}_cifar10_option_a.npz")
    parser.add_argument("--out", default="/work/bench/tfmot")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out/results.json")
    args = parser.parse_args(argv)

    path = os.path.join(args.out, "results.json")
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    if args.table_only:
        print(table(rows))
        return rows
    done = {row_key(r) for r in rows}
    host = host_info()
    data = load_cifar(args.data_path)
    test_images, test_labels = data[2], data[3]
    print(f"host: {host}\ntrain {len(data[1])} images, test {len(test_labels)} images", flush=True)

    for arch in args.archs:
        # The dense reference, and the check that the model is built right.
        model = pretrained(arch, args.weights)
        top1 = keras_top1(model, test_images, test_labels)
        print(f"{arch} pretrained top-1 {top1:.2%} (expected {EXPECTED_TOP1[arch]:.2%})", flush=True)
        if abs(top1 - EXPECTED_TOP1[arch]) * len(test_labels) > 0.5:
            sys.exit(f"{arch}: top-1 {top1:.4f} is not the expected {EXPECTED_TOP1[arch]}: the model is wrong")
        row = {"kind": "pretrained", "arch": arch, "sparsity": 0.0, "seed": None}
        if row_key(row) not in done:
            row.update(measure(model, test_images, test_labels), wall_seconds=0.0, host=host)
            rows.append(row)
            save(rows, path)
        for sparsity in args.sparsities:
            for seed in args.seeds:
                row = {"kind": "tfmot", "arch": arch, "sparsity": sparsity, "seed": seed,
                       "epochs": args.epochs, "batch": args.batch}
                if row_key(row) in done:
                    print(f"skip {arch} sparsity {sparsity} seed {seed}: in {path}")
                    continue
                print(f"--- {arch} sparsity {sparsity} seed {seed}", flush=True)
                stripped, wall, facts = finetune(arch, sparsity, seed, args, data)
                row.update(facts)
                row.update(measure(stripped, test_images, test_labels), wall_seconds=round(wall, 1), host=host)
                print({k: v for k, v in row.items() if k != "host"}, flush=True)
                rows.append(row)
                save(rows, path)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
