"""`instance_function` and `fresh_function`: `tf.function`s counted as their own for retracing warnings.

TensorFlow warns when "5 out of the last 5 calls to <function> triggered tf.function retracing",
and it keys that count by the method's *code*, so that a model rebuilt in a loop is caught.
A run builds a new trainer and evaluator per stage (each with its own model or variables),
and each traces its functions once: counted together they look like one function retracing
at every call. Keying by the instance (a `functools.partial`, which has no code object of its
own) keeps the warning for what it is meant to catch: one object's function tracing again.

Both trace without AutoGraph (`autograph=False`, unless asked): the toolkit's traced code uses
Python control flow only on Python values, and `tf.while_loop` / `tf.cond` where a tensor decides,
so converting every function a trace reaches (nets, tasks, optimizers) would only add tracing time.
"""
from __future__ import annotations

import functools

import tensorflow as tf


def instance_function(method, **kwargs):
    """`tf.function(method, autograph=False, **kwargs)` whose retracing is counted per instance (see above)."""
    return tf.function(functools.partial(method.__func__, method.__self__), **{"autograph": False, **kwargs})


def fresh_function(fn, **kwargs):
    """`tf.function(fn, **kwargs)` counted on its own: for a function (often a lambda or closure)
    made anew at each call of the code that makes it (one per net, per stage), which TensorFlow
    would otherwise count with every earlier one made by the same code."""
    return tf.function(functools.partial(fn), **{"autograph": False, **kwargs})
