"""Training tasks of the methods, beyond `op_utils.task.Classify`.

`Distill`: a student trained on labels and on a frozen teacher's softened outputs. The teacher
runs in inference mode (BN moving statistics) inside the same compiled step as the student,
its output behind `stop_gradient`; it is not among the trained variables, so it gets no update
of any kind, and it is not checkpointed (it is rebuilt from its file).
"""

from __future__ import annotations

import tensorflow as tf

from op_utils.losses import hinton_kd, soft_cross_entropy
from op_utils.task import LossOut, Task, inputs_labels

CONVENTIONS = ("hinton", "pocketflow")


def kd_loss(teacher_logits, student_logits, labels, weight: float, temperature: float, convention: str,
            ce_weight: float = 1.0):
    """`(per-example loss, ce, kd)` of knowledge distillation.

    * `hinton`: `CE(y, s) + weight * T^2 * KL(softmax(t/T) || softmax(s/T))` (Hinton et al.).
    * `pocketflow`: `CE(y, s) + weight * CE(softmax(t/T), softmax(s/T))`, no `T^2` (PocketFlow's
      `--enbl_dst`, which used weight 4 and T 4): the same gradient as `hinton` with weight
      `weight / T^2`, and a logged term that includes the teacher's entropy.

    `ce_weight` scales the label term (0: the soft targets alone, as data-free distillation
    trains, its labels being only the classes the images were made for).
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, student_logits)
    if convention == "hinton":
        kd = hinton_kd(teacher_logits, student_logits, temperature)
    elif convention == "pocketflow":
        kd = soft_cross_entropy(teacher_logits, student_logits, temperature)
    else:
        raise ValueError(f"unknown KD convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return ce_weight * ce + weight * kd, ce, kd


class Distill(Task):
    """Train `student` on `(images, labels, ...)` batches against a frozen `teacher`.

    Args:
        student, teacher: classifiers with the same classes, called as `net(x, training)`.
        weight, temperature, convention, ce_weight: see `kd_loss`.
    """

    def __init__(self, student, teacher, weight: float, temperature: float, convention: str = "hinton",
                 ce_weight: float = 1.0):
        super().__init__(name="distill")
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown KD convention {convention!r}; known: {', '.join(CONVENTIONS)}")
        self.student, self.teacher = student, teacher
        self.weight, self.temperature, self.convention = float(weight), float(temperature), convention
        self.ce_weight = float(ce_weight)

    def variables_to_train(self):
        return list(self.student.trainable_variables)

    def loss(self, batch, training):
        images, labels = inputs_labels(batch)
        logits = self.student(images, training=training)
        teacher = tf.stop_gradient(self.teacher(images, training=False))
        per_example, ce, kd = kd_loss(tf.cast(teacher, tf.float32), tf.cast(logits, tf.float32), labels,
                                      self.weight, self.temperature, self.convention, self.ce_weight)
        return LossOut(per_example, {"ce": ce, "kd": kd}, logits, labels)

    @property
    def eval_model(self):
        return self.student

    def checkpoint_items(self):
        return {"model": self.student}
