"""Helpers the tests share, in one place: import them from here, never from another test module.

* `support.nets`: small registered nets, random params and masks, inputs, the scale-relative
  comparison (`assert_close_to_scale`), one net per family, a few engine steps of a net.
* `support.toy`: tiny models (MLP, a conv net with BN) and data for the engine's tests.
* `support.data`: datasets written in their real on-disk formats (CIFAR python batches, MNIST
  idx, ImageNet TFRecords), tiny, in a temporary folder.
* `support.procs`: subprocess helpers (a toy training script run as another process, loopback
  multi-worker clusters).
* `support.runs`: what the pipeline tests read in a run: training steps taken (and a crash
  injected before one), digests of a run folder, one-line errors.
"""
