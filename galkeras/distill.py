"""Pseudo-label supervision of the student θC (§3.3, Eq. 6-11).

`PseudoLabelDistillation` is an ordinary `keras.losses.Loss`: it distils any
teacher's class probabilities into any student that outputs logits, so it is usable
on its own, e.g. `student.compile(loss=PseudoLabelDistillation(0.8))` followed by
`student.fit(x, teacher_probabilities)`.
"""

import keras
import tensorflow as tf


def pseudo_label_loss(teacher_probabilities, student_logits, epsilon):
    """Per-sample `L_c + L_d` of Eq. (9)-(11).

    - `L_c`: cross entropy of the student against the hard pseudo-label
      `argmax p_joint`, counted only where `max p_joint > epsilon` (Eq. 9).
    - `L_d`: `KL(p_joint || p_C)` (Eq. 10).

    The batch mean of the returned vector divides by the full batch size, not by
    the number of confident samples, as Eq. (9) writes it.

    Args:
        teacher_probabilities: float `[N, K]`, rows summing to 1 (`p_joint`).
        student_logits: float `[N, K]`, the student's logits.
        epsilon: confidence threshold ε in [0, 1).

    Returns:
        float32 `[N]`, the per-sample loss.
    """
    p = tf.cast(teacher_probabilities, tf.float32)
    log_q = tf.nn.log_softmax(tf.cast(student_logits, tf.float32), axis=-1)
    pseudo_labels = tf.argmax(p, axis=-1)
    confident = tf.cast(tf.reduce_max(p, axis=-1) > epsilon, tf.float32)
    hard_ce = -tf.gather(log_q, pseudo_labels, axis=-1, batch_dims=1)
    # xlogy gives 0 * log 0 = 0 for classes the teacher rules out.
    kl = tf.reduce_sum(tf.math.xlogy(p, p) - p * log_q, axis=-1)
    return confident * hard_ce + kl


@keras.saving.register_keras_serializable(package="galkeras")
class PseudoLabelDistillation(keras.losses.Loss):
    """Thresholded cross entropy plus KL to a teacher's probabilities (Eq. 9-11).

    `y_true` holds the teacher's probabilities `[N, K]`; `y_pred` holds the
    student's logits `[N, K]`. With the default `"sum_over_batch_size"` reduction
    the loss divides by the full batch size, as Eq. (9) does.

    Args:
        epsilon: float, the confidence threshold ε above which a pseudo-label is
            used in the cross-entropy term (paper: 0.8).

    Example:
    ```python
    student.compile(optimizer="sgd", loss=galkeras.PseudoLabelDistillation(0.8))
    student.fit(images, teacher_probabilities, epochs=5)
    ```

    Reference: Yan et al., Applied Sciences 2023, 13(3), 1823, §3.3.
    """

    def __init__(self, epsilon=0.8, name="pseudo_label_distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1); got {epsilon}.")
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        return pseudo_label_loss(y_true, y_pred, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
