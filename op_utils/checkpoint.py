"""Saving and restoring the training state with ``tf.train.CheckpointManager``.

Why the manager is safe against a kill mid-save: TensorFlow writes a checkpoint's data
files first and its ``.index`` file last, and only then rewrites the small ``checkpoint``
state file (atomically) to point at it. A process killed at any moment leaves the
previous checkpoint complete and still listed as the latest.

With ``MultiWorkerMirroredStrategy`` every worker must take part in a save (reading
synchronised variables is a collective operation), but only the chief's copy is kept:
the other workers write into a temporary folder that is deleted right after. All workers
restore from the chief's folder, which therefore has to be on a shared file system.
"""
import os
import shutil

import tensorflow as tf

from utils.errors import ParamsError
from utils.logs import get_logger

log = get_logger(__name__)


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker strategy."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a ``tf.train.Checkpoint`` in a folder.

    Args:
        checkpoint: What to save (e.g. ``Trainer.checkpoint``).
        directory: The folder, usually ``<train_path>/ckpt``.
        strategy: The training strategy (decides who is the chief).
        max_to_keep: How many checkpoints to keep.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str,
                 strategy: tf.distribute.Strategy | None = None, max_to_keep: int = 2) -> None:
        self.checkpoint = checkpoint
        self.directory = os.fspath(directory)
        self.chief = is_chief(strategy)
        if self.chief:
            self._write_dir = self.directory
        else:
            task_id = strategy.cluster_resolver.task_id
            self._write_dir = os.path.join(self.directory, f"tmp_worker_{task_id}")
        self._manager = tf.train.CheckpointManager(
            checkpoint, self._write_dir, max_to_keep=max_to_keep, checkpoint_name="ckpt"
        )

    @property
    def latest(self) -> str | None:
        """The path prefix of the newest complete checkpoint, or None."""
        return tf.train.latest_checkpoint(self.directory)

    def save(self, number: int) -> str:
        """Writes checkpoint ``ckpt-<number>`` and drops the ones beyond ``max_to_keep``.

        Returns:
            The path prefix of the chief's checkpoint.
        """
        path = self._manager.save(checkpoint_number=int(number))
        if not self.chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
            return os.path.join(self.directory, os.path.basename(path))
        return path

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint, if there is one.

        Returns:
            The restored path prefix, or None if the folder holds no checkpoint.

        Raises:
            ParamsError: If the checkpoint does not fit the objects being restored.
        """
        path = self.latest
        if path is None:
            return None
        status = self.checkpoint.restore(path)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "mismatch"
            raise ParamsError(
                f"checkpoint {path} does not match this model/optimizer: {first}"
            ) from None
        return path
