"""The packed params file: a sparse or quantized net stored the way it is meant to be used.

PocketFlow's sparse and quantized checkpoints came out *larger* than the original (masks and
float copies beside the weights, #179, #276). `save_packed(net, "x.npz")` stores, per parameter:

* a quantized kernel (a `nets.quantizers` weight quantizer is its last transform): its integer
  codes bit-packed at the quantizer's width (`utils.bitpack`) plus, per bucket, the float32
  `scale` and `offset` (uniform: 64 bits a bucket, as PocketFlow counted) or the `2^bits`
  centres, span and offset (non-uniform);
* any other parameter that is at least half zeros (sparse kernels): a bitmask of its nonzeros
  and their float32 values;
* everything else as float32.

It is one `.npz` (read with `allow_pickle=False`): a JSON header and one byte array holding
every array back to back. The header holds the spec of the deployed net (`nets.deploy.baked`: the weight transforms baked in, activation quantizers kept)
and the state of the transforms it keeps. `load_packed` rebuilds that net; its parameters equal
bit for bit the values the fake-quantized net computes with (`code * scale + offset` is the
quantizers' own arithmetic, in float32).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zipfile

import numpy as np
import tensorflow as tf

import nets
from nets.deploy import baked
from nets.quantizers import NonUniformQuantizer, UniformQuantizer, BucketLayout
from utils.atomic import atomic_write_bytes
from utils.bitpack import pack_bits, pack_sparse, unpack_bits, unpack_sparse
from utils.errors import ParamsError
from utils.params_io import check_params, params_bytes

FORMAT = "tf-compress packed params 1"
_HEADER = "__header__"


def _encode(layer, name) -> tuple:
    """`(header entry, {suffix: array})` of one parameter."""
    var = layer.named[name]
    transforms = layer.transforms.get(name, [])
    shape = list(var.shape)
    if transforms and isinstance(transforms[-1], (UniformQuantizer, NonUniformQuantizer)):
        quantizer = transforms[-1]
        value = tf.convert_to_tensor(var)
        for transform in transforms[:-1]:
            value = transform(value)
        parts = quantizer.codes(value)
        codes = parts.pop("codes")
        layout = quantizer.layout
        entry = {"kind": "uniform" if isinstance(quantizer, UniformQuantizer) else "nonuniform", "shape": shape,
                 "bits": quantizer.bits, "buckets": quantizer.buckets, "bucket_size": quantizer.bucket_size,
                 "channel_axis": layout.channel_axis, "codes_shape": list(codes.shape)}
        return entry, {"codes": pack_bits(codes, quantizer.bits),
                       **{k: np.asarray(v, np.float32) for k, v in parts.items()}}
    value = np.asarray((layer.param(name) if transforms else var).numpy(), np.float32)
    if value.size >= 16 and np.count_nonzero(value) <= value.size // 2:
        bitmask, values = pack_sparse(value)
        return {"kind": "sparse", "shape": shape}, {"bitmask": bitmask, "values": values}
    return {"kind": "dense", "shape": shape}, {"values": value}


def _decode(entry: dict, arrays: dict) -> np.ndarray:
    shape, kind = tuple(entry["shape"]), entry["kind"]
    if kind == "dense":
        return arrays["values"].reshape(shape)
    if kind == "sparse":
        return unpack_sparse(arrays["bitmask"], arrays["values"], shape)
    count = int(np.prod(entry["codes_shape"]))
    codes = unpack_bits(arrays["codes"], entry["bits"], count).reshape(entry["codes_shape"])
    if kind == "uniform":
        values = codes.astype(np.float32) * arrays["scale"] + arrays["offset"]
    elif kind == "nonuniform":
        values = np.take_along_axis(arrays["centres"], codes, axis=1) * arrays["span"] + arrays["offset"]
    else:
        raise ParamsError(f"unknown packed entry kind {kind!r}")
    layout = BucketLayout(shape, entry["buckets"], entry["channel_axis"], entry["bucket_size"])
    return layout.from_buckets(tf.constant(values.astype(np.float32))).numpy()


def save_packed(net, path: str) -> dict:
    """Write `net` packed to `path` (atomically); returns its sizes beside the float pickle's.

    `float_bytes` is the size of the deployed net's params as a float32 pickle, and the
    `*_gzip_bytes` the gzip sizes of both (TF-MOT's convention for sparse models).
    """
    deployed = baked(net)
    header = {"format": FORMAT, "spec": deployed.spec(), "entries": {}}
    arrays = {}
    for layer in net.layers.values():
        for name in layer.named:
            key = f"{layer.key}/{name}:0"
            entry, parts = _encode(layer, name)
            header["entries"][key] = entry
            arrays.update({f"{key}|{suffix}": value for suffix, value in parts.items()})
    for key, value in deployed.transform_state().items():
        arrays[f"state|{key}"] = value
    data = _container(header, arrays)
    atomic_write_bytes(path, data)
    floats = params_bytes({k: np.asarray(v, np.float32) for k, v in deployed.get_params().items()})
    return {"packed_bytes": len(data), "packed_gzip_bytes": len(gzip.compress(data)),
            "float_bytes": len(floats), "float_gzip_bytes": len(gzip.compress(floats))}


def _container(header: dict, arrays: dict) -> bytes:
    """One `.npz` of two members: the JSON header (with each array's dtype, shape and place) and
    all arrays' bytes back to back (a member per array would cost ~300 bytes of zip and npy
    headers each, as much as a small net's quantized kernels)."""
    places, blobs, offset = {}, [], 0
    for key, value in arrays.items():
        value = np.asarray(value)  # (not ascontiguousarray: it makes scalars 1-d)
        places[key] = {"dtype": value.dtype.str, "shape": list(value.shape), "offset": offset}
        blobs.append(value.tobytes())
        offset += value.nbytes
    header = {**header, "arrays": places}
    buffer = io.BytesIO()
    np.savez(buffer, **{_HEADER: np.frombuffer(json.dumps(header, separators=(",", ":")).encode("utf-8"),
                                              np.uint8),
                        "data": np.frombuffer(b"".join(blobs), np.uint8)})
    return buffer.getvalue()


def _open(path: str) -> tuple:
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(data[_HEADER].tobytes().decode("utf-8"))
        blob = data["data"]
    arrays = {}
    for key, place in header["arrays"].items():
        dtype = np.dtype(place["dtype"])
        if dtype.hasobject:
            raise ValueError(f"object array {key}")
        count = int(np.prod(place["shape"]))
        arrays[key] = np.frombuffer(blob, dtype, count, place["offset"]).reshape(tuple(place["shape"]))
    return header, arrays


def read_packed(path: str) -> tuple:
    """`(spec, params, transform state)` stored in a packed file."""
    if not os.path.isfile(path):
        raise ParamsError(f"packed params file {path} does not exist")
    try:
        header, arrays = _open(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: not a packed params file ({type(err).__name__})") from None
    if header.get("format") != FORMAT:
        raise ParamsError(f"{path}: unknown packed format {header.get('format')!r}")
    params = {}
    for key, entry in header["entries"].items():
        prefix = f"{key}|"
        params[key] = _decode(entry, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    state = {k[len("state|"):]: v for k, v in arrays.items() if k.startswith("state|")}
    return header["spec"], params, state


def load_packed(path: str, **config):
    """The deployed net stored in a packed file (`config` overrides its net config)."""
    spec, params, state = read_packed(path)
    net = nets.build_from_spec(spec, **config)
    check_params(net.param_shapes(), params, what=f"{path} ({spec['arch']})")
    net.set_params(params)
    net.load_transform_state(state, what=path)
    return net
