"""Compression methods; importing this package registers them."""

from codebase.methods import baselines, kd, plain  # noqa: F401  (register "l1", "random", "kd", "none")
from codebase.methods import channel  # noqa: F401  (registers "cp", "cpr")
from codebase.methods import dcp  # noqa: F401  (registers "dcp")
from codebase.methods import dfkd  # noqa: F401  (registers "dfkd")
from codebase.methods import quantization, sparsity  # noqa: F401  (register "uq", "nuq", "ws")
from codebase.methods import policy  # noqa: F401  (registers "rl_cp", "rl_ws", "rl_uq", "rl_nuq")
from codebase.methods import resrep  # noqa: F401  (registers "resrep")
from codebase.methods import shunt  # noqa: F401  (registers "shunt")
from codebase.methods.base import Method, Stage, get_method, method_names, register
from codebase.methods.ekg import method as _ekg  # noqa: F401  (registers "ekg")

__all__ = ["Method", "Stage", "get_method", "method_names", "register"]
