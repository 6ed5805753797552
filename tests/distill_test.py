import keras
import numpy as np

from galkeras.distill import PseudoLabelDistillation, pseudo_label_loss


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_loss_matches_hand_computation():
    p = np.array(
        [[0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.1, 0.85, 0.05], [0.3, 0.3, 0.4]],
        np.float32,
    )
    logits = np.array(
        [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0]],
        np.float32,
    )
    log_q = _log_softmax(logits.astype(np.float64))
    # Only rows 0 and 2 pass max p > 0.8; their pseudo-labels are 0 and 1.
    l_c = np.array([-log_q[0, 0], 0.0, -log_q[2, 1], 0.0])
    kl = np.array(
        [
            sum(pi * (np.log(pi) - lq) for pi, lq in zip(row, lrow) if pi > 0)
            for row, lrow in zip(p.astype(np.float64), log_q)
        ]
    )
    per_sample = pseudo_label_loss(p, logits, 0.8).numpy()
    np.testing.assert_allclose(per_sample, l_c + kl, rtol=1e-5)
    # Eq. (9): the batch loss divides by the full batch size (4), not by the
    # number of confident samples (2).
    batch = PseudoLabelDistillation(0.8)(p, logits)
    np.testing.assert_allclose(float(batch), (l_c.sum() + kl.sum()) / 4, rtol=1e-5)


def test_threshold_is_strict():
    p = np.array([[0.8, 0.2]], np.float32)
    logits = np.zeros((1, 2), np.float32)
    # max p == epsilon is not confident: only the KL term remains.
    kl = 0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5)
    np.testing.assert_allclose(
        pseudo_label_loss(p, logits, 0.8).numpy(), [kl], rtol=1e-5
    )


def test_loss_distils_a_teacher_into_a_student_with_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    teacher = np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)] * 0.9 + 0.05
    keras.utils.set_random_seed(0)
    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    student.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=PseudoLabelDistillation(0.8)
    )
    before = student.evaluate(x, teacher, verbose=0)
    student.fit(x, teacher, epochs=30, verbose=0)
    after = student.evaluate(x, teacher, verbose=0)
    assert after < 0.5 * before
    agreement = (student.predict(x, verbose=0).argmax(1) == teacher.argmax(1)).mean()
    assert agreement > 0.9
    restored = PseudoLabelDistillation.from_config(
        PseudoLabelDistillation(0.7).get_config()
    )
    assert restored.epsilon == 0.7
