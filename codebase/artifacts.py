"""A saved net: its params pickle and the files beside it.

`save_net(net, "x.pkl")` writes three files, each atomically:

* `x.pkl`: the params in the EKG format (`{"scope/var:0": ndarray}`), which the reference
  pickles also use and which any other tool reading them understands;
* `x.arch.json`: the spec (`Net.spec()`: arch, config, widths, and the attached transforms
  with their configs), which rebuilds a slimmed or transformed architecture;
* `x.state.npz`: the transforms' state (compactor kernels, magnitude masks, quantizer ranges),
  plain arrays read with `allow_pickle=False`; only written when the net has some.

`load_net` rebuilds from them; a pickle without a spec (the EKG reference's) is rebuilt from
its kernel shapes. A step of a run reads its input this way and writes its output this way,
so a chain of methods passes nets from step to step through files that `test.py` also reads.

`load_net` also imports another framework's weights, a `.npz` of plain arrays (read with
`allow_pickle=False`), for an architecture whose net class can convert them: a classmethod
`import_arrays(arch, arrays, data_stats, config) -> (params, config changes)`
(`nets.resnet_a.ResNetA`: PyTorch's option-A ResNets). Foreign weights may expect another input
normalisation than the data loader's, so the caller passes the loader's statistics,
`data_stats=(mean, std)` of 0..255 pixels (`DatasetInfo.mean`, `.std`), and the net class
turns them into config (an input affine map). Only foreign imports read them. Saving the
imported net writes that config into its spec, so every later step rebuilds it exactly.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile

import numpy as np

import nets
from utils.atomic import atomic_open, atomic_write_json
from utils.errors import ConfigError, ParamsError
from utils.params_io import load_params, save_params


def spec_path(params_path: str) -> str:
    """The spec saved beside a params pickle: `x.pkl` -> `x.arch.json`."""
    return os.path.splitext(os.fspath(params_path))[0] + ".arch.json"


def state_path(params_path: str) -> str:
    """The transform state saved beside a params pickle: `x.pkl` -> `x.state.npz`."""
    return os.path.splitext(os.fspath(params_path))[0] + ".state.npz"


def save_net(net, path: str) -> None:
    """Write the params pickle and, beside it, the spec and (if any) the transform state."""
    path = os.fspath(path)
    state = net.transform_state()
    if state:
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        with atomic_open(state_path(path), "wb") as f:
            f.write(buffer.getvalue())
    elif os.path.exists(state_path(path)):
        os.remove(state_path(path))
    atomic_write_json(spec_path(path), net.spec())
    save_params(path, net.get_params())


def copy_net_files(source: str, target: str) -> None:
    """Copy a saved net (pickle, spec, state) to `target` (the run's final `trained_params.pkl`)."""
    for make in (lambda p: p, spec_path, state_path):
        if os.path.exists(make(source)):
            with open(make(source), "rb") as src, atomic_open(make(target), "wb") as dst:
                shutil.copyfileobj(src, dst)


def read_spec(path: str) -> dict | None:
    """The spec beside params pickle `path`, or None if it has none."""
    spec_file = spec_path(path)
    if not os.path.isfile(spec_file):
        return None
    try:
        with open(spec_file, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ParamsError(f"{spec_file}: not a readable spec ({type(err).__name__})") from None
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ParamsError(f"{spec_file}: not a spec (no 'arch')")
    return spec


def _read_npz(path: str, what: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ParamsError(f"{path}: not a readable {what} ({err})") from None


def is_foreign(path: str) -> bool:
    """Whether `path` holds another framework's weights (a `.npz`) rather than a params pickle."""
    return os.fspath(path).lower().endswith(".npz")


def _importer(cls):
    """The net class's `import_arrays`, or None: the protocol of foreign weights (module docstring)."""
    return getattr(cls, "import_arrays", None)


def import_net(arch: str | None, path: str, data_stats=None, masked: bool = False, **config):
    """A net of `arch` holding the foreign weights of the `.npz` at `path` (see the module docstring).

    Raises:
        ConfigError / ParamsError: no architecture, one that cannot import weights, no data
            statistics where the net needs them, arrays of another net; one line naming `path`.
    """
    if arch is None:
        raise ConfigError(f"{path} holds foreign weights and no architecture; give --arch")
    name, cls, defaults = nets.lookup(arch)
    importer = _importer(cls)
    if importer is None:
        able = [a for a in nets.list_archs() if _importer(nets.lookup(a)[1]) is not None]
        raise ConfigError(f"{path}: {name} cannot import foreign weights (.npz); archs that can: "
                          f"{', '.join(able) or 'none'}")
    if not os.path.isfile(path):
        raise ParamsError(f"params file {path} does not exist")
    arrays = _read_npz(path, "weights file (.npz)")
    try:
        params, changes = importer(name, arrays, data_stats, {**defaults, **config})
        net = nets.build(name, masked=masked, **{**config, **changes})
        net.set_params(params)
    except (ConfigError, ParamsError) as err:
        raise type(err)(f"{path}: {err}") from None
    return net


def load_net(arch: str | None, path: str, masked: bool = False, data_stats=None, **config):
    """Rebuild a (possibly slimmed or transformed) net from a params pickle and its spec, or
    import foreign weights from a `.npz` (`import_net`).

    Args:
        arch: the expected architecture (None: take it from the spec, which must exist).
        path: the params pickle, or a `.npz` of foreign weights.
        masked: build the net with masks (for pruning it further).
        data_stats: `(mean, std)` of the 0..255 pixels with which the data loader normalises
            the net's input; read only when importing foreign weights.
        config: net config overrides (`num_classes`, `input_size`).

    Raises:
        ParamsError / ConfigError: a missing, corrupt or unsafe file, or params of another
            architecture, each named in one line.
    """
    if is_foreign(path):
        return import_net(arch, path, data_stats, masked=masked, **config)
    params = load_params(path)
    spec = read_spec(path)
    if spec is None:
        if arch is None:
            raise ConfigError(f"{path} has no {os.path.basename(spec_path(path))} beside it; give --arch")
        return nets.build_from_params(arch, params, masked=masked, **config)
    if arch is not None and nets.lookup(spec["arch"])[0] != nets.lookup(arch)[0]:
        raise ConfigError(f"{path} holds a {spec['arch']} (see {spec_path(path)}), not --arch {arch}")
    try:
        net = nets.build_from_spec(spec, masked=masked, **config)
    except (KeyError, ValueError, TypeError) as err:
        raise ParamsError(f"{spec_path(path)}: cannot rebuild the net ({err})") from None
    net.set_params(params)
    if spec.get("transforms") and net.transform_state():  # some transforms hold no state
        if not os.path.isfile(state_path(path)):
            raise ParamsError(f"{path}: its spec lists transforms but {state_path(path)} is missing")
        try:
            net.load_transform_state(_read_npz(state_path(path), "transform state file"), what=state_path(path))
        except ValueError as err:
            raise ParamsError(str(err)) from None
    return net


def save_pruning_state(path: str, net, progress: dict, extra: dict | None = None) -> None:
    """A layer-by-layer pruning's state, atomically, as plain arrays (no pickle): the net's params and
    masks, `extra` arrays (`{name: ndarray}`, e.g. auxiliary heads) and `progress` (JSON-able)."""
    arrays = {f"param/{k}": v for k, v in net.get_params().items()}
    arrays.update({f"mask/{k}": g.mask_numpy() for k, g in net.groups.items() if g.masked})
    arrays.update({f"extra/{k}": v for k, v in (extra or {}).items()})
    arrays["progress"] = np.array(json.dumps(progress))
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_pruning_state(path: str, net) -> tuple:
    """Restores `net`'s params and masks from `save_pruning_state`; returns `(progress, extra)`."""
    with np.load(path, allow_pickle=False) as data:
        if "progress" not in data.files:
            raise ConfigError(f"{path} is not a pruning state this version wrote: delete it to prune from the start")
        net.set_params({k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")})
        for key in data.files:
            if key.startswith("mask/"):
                net.groups[key[len("mask/"):]].mask.assign(data[key])
        extra = {k[len("extra/"):]: data[k] for k in data.files if k.startswith("extra/")}
        return json.loads(str(data["progress"])), extra
