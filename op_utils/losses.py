"""Loss functions shared by the methods: soft cross-entropy, Hinton's KD, EKG's KL and memory-bank KD.

Every function returns per-example values ([batch]); the trainer sums them and divides by the
global batch size.
"""

import tensorflow as tf


def soft_cross_entropy(target_logits, logits, temperature: float = 1.0):
    """Cross-entropy of softmax(logits / T) against the soft targets softmax(target_logits / T)."""
    target = tf.nn.softmax(target_logits / temperature)
    return -tf.reduce_sum(target * tf.nn.log_softmax(logits / temperature), axis=-1)


def hinton_kd(teacher_logits, student_logits, temperature: float):
    """Hinton et al.'s distillation term: `T^2 * KL(softmax(t/T) || softmax(s/T))` per example.

    The `T^2` keeps the gradient's scale independent of the temperature (the soft targets'
    gradients scale as `1/T^2`), so the weight of this term against the label loss means the
    same at every `T`. Its gradient equals that of the soft cross-entropy times `T^2`.
    """
    log_p = tf.nn.log_softmax(teacher_logits / temperature)
    log_q = tf.nn.log_softmax(student_logits / temperature)
    return temperature ** 2 * tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def kl_t(target_logits, logits, temperature: float):
    """EKG's `KL_T(a||b) = T * sum_c softmax(a/T) (log softmax(a/T) - log softmax(b/T))`.

    The factor is T, not the T^2 of Hinton et al.; kept because the reference's defaults
    (temperature 4, learning rate 0.01) were tuned with it.
    """
    log_p = tf.nn.log_softmax(target_logits / temperature)
    log_q = tf.nn.log_softmax(logits / temperature)
    return temperature * tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def select_teachers(bank, student_logits, temperature: float):
    """Memory-bank teacher selection of EKG, per batch.

    Args:
        bank: [batch, classes, teachers] logits of the interim sub-networks; teacher 0 is the
            lowest-loss one ("top").
        student_logits: [batch, classes] (averaged over augmented views).

    Returns:
        [batch, classes] target logits: the mean of the teachers that are closer to the top
        teacher than the student is (summed KL over the batch), or of the top teacher alone.
    """
    top = bank[:, :, 0]
    d_student = tf.reduce_sum(kl_t(top, student_logits, temperature))
    teachers = tf.transpose(bank, [2, 0, 1])  # [teachers, batch, classes]
    d_teachers = tf.reduce_sum(kl_t(top[None], teachers, temperature), axis=-1)
    selected = tf.cast(d_teachers < d_student, bank.dtype)
    count = tf.maximum(tf.reduce_sum(selected), 1.0)
    mixed = tf.einsum("t,tbc->bc", selected, teachers) / count
    # If no teacher is selected (the student already matches the top one), use the top one.
    return tf.where(tf.reduce_sum(selected) > 0, mixed, top)
