"""The validator's reward replica against hand-computed cases and a literal implementation of the rules."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, matthews_corrcoef

from roadwork_core.subnet.reward import query_rewards, reward_proxy, window_metrics


def reference_rewards(labels, answers) -> list[float]:
    """The rules of issue 14 written out query by query: a 100-entry history, sklearn metrics."""
    hist_a: deque = deque(maxlen=100)
    hist_y: deque = deque(maxlen=100)

    def metrics(window: int) -> tuple[float, float]:
        pa, py = list(hist_a)[-window:], list(hist_y)[-window:]
        keep = [i for i, p in enumerate(pa) if p != -1]
        if not keep:
            return 0.0, 0.0
        preds = np.round(np.array([pa[i] for i in keep], dtype=float))
        ys = np.array([py[i] for i in keep], dtype=float)
        try:
            acc = accuracy_score(ys, preds)
            mcc = max(0.0, matthews_corrcoef(ys, preds)) if len(np.unique(ys)) > 1 else 0.0
        except ValueError:  # NaN / inf answers: the validator falls back to zero metrics
            return 0.0, 0.0
        return mcc, acc

    out = []
    for y, a in zip(labels, answers, strict=True):
        hist_a.append(a)
        hist_y.append(y)
        mcc, _ = metrics(100)
        _, acc = metrics(10)
        reward = (0.5 * mcc + 0.5 * acc) ** 3
        if a == -1 or a < 0 or a > 1:
            reward = 0.0
        out.append(reward)
    return out


def test_first_query_one_class_window_gives_accuracy_only() -> None:
    # one label in the window: MCC is 0, accuracy 1 -> (0.5)^3
    assert query_rewards([1], [0.9]) == pytest.approx([0.125])


def test_half_rounds_to_no_roadwork() -> None:
    # 0.5 -> np.round -> 0: right for label 0, wrong for label 1
    assert query_rewards([1, 0], [0.9, 0.5]) == pytest.approx([0.125, 1.0])
    # labels (1, 1) one class; predictions (1, 0): accuracy 0.5 -> 0.25^3
    assert query_rewards([1, 1], [0.9, 0.5])[1] == pytest.approx(0.25**3)
    # 0.51 rounds up
    assert query_rewards([0, 1], [0.1, 0.51])[1] == pytest.approx(1.0)


def test_no_answer_gets_zero_and_leaves_the_metrics() -> None:
    r = query_rewards([1, 0, 1, 0], [0.9, 0.1, -1, 0.2])
    assert r[2] == 0.0
    # the -1 is dropped: labels (1, 0, 0), predictions (1, 0, 0): MCC 1, accuracy 1
    assert r[3] == pytest.approx(1.0)


def test_out_of_range_answer_gets_zero_but_joins_the_history() -> None:
    r = query_rewards([1, 0, 1], [1.2, 0.1, 0.8])
    assert r[0] == 0.0
    assert r[2] == pytest.approx(1.0)  # 1.2 rounded to 1 counted as correct
    r = query_rewards([1, 0, 1], [1.7, 0.1, 0.8])
    # 1.7 -> 2: a wrong third class. labels (1,0,1), preds (2,0,1): accuracy 2/3; MCC multiclass
    mcc = matthews_corrcoef([1, 0, 1], [2, 0, 1])
    assert r[2] == pytest.approx((0.5 * mcc + 0.5 * 2 / 3) ** 3)
    assert query_rewards([0, 1], [0.1, -0.2])[1] == 0.0


def test_negative_mcc_is_clipped_and_one_class_predictions_give_zero_mcc() -> None:
    assert query_rewards([0, 1], [0.9, 0.1])[1] == 0.0  # MCC -1 -> 0, accuracy 0
    assert query_rewards([0, 1], [0.2, 0.3])[1] == pytest.approx(0.25**3)  # MCC 0, accuracy 0.5


def test_accuracy_window_is_the_last_ten() -> None:
    labels = [1] * 11
    answers = [0.1] + [0.9] * 10  # the first is wrong
    mcc, acc = window_metrics(labels, answers, 10)
    assert acc[9] == pytest.approx(0.9)
    assert acc[10] == pytest.approx(1.0)  # the wrong answer has left the window
    assert np.all(mcc == 0.0)  # one-class labels throughout


def test_mcc_window_is_the_last_hundred() -> None:
    labels = [0] + [1] * 100
    answers = [0.1] + [0.9] * 100  # all correct
    r = query_rewards(labels, answers)
    assert r[99] == pytest.approx(1.0)  # window 0..99 holds both classes: MCC 1
    assert r[100] == pytest.approx(0.125)  # window 1..100 is one class: MCC 0


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_nan_answer_zeroes_the_windows_holding_it() -> None:
    labels = [0, 1] + [0, 1] * 10
    answers = [0.1, np.nan] + [0.1, 0.9] * 10
    r = query_rewards(labels, answers)
    mcc, acc = window_metrics(labels, answers, 10)
    assert r[1] == 0.0
    assert acc[10] == 0.0 and acc[11] > 0.9  # the NaN at index 1 leaves the 10-window after index 10
    assert np.allclose(r, reference_rewards(labels, answers))


def test_agrees_with_the_literal_rules_on_random_sequences() -> None:
    # The reference calls sklearn twice per query (~20 s for 8 random lengths under CI load): four
    # sequences, each past the 100-query history so the window's eviction is always exercised.
    rng = np.random.default_rng(0)
    for trial in range(4):
        n = int(rng.integers(110, 220))
        labels = rng.integers(0, 2, n)
        if trial % 2 == 1:
            labels[:] = 1  # long one-class stretches
        kind = rng.random(n)
        answers = np.where(
            kind < 0.6,
            np.clip(labels * 0.7 + rng.normal(0.15, 0.3, n), 0, 1),  # mostly sensible answers
            np.where(kind < 0.7, 0.5, np.where(kind < 0.8, -1.0, rng.uniform(-0.8, 2.8, n))),
        )
        expected = reference_rewards(labels.tolist(), answers.tolist())
        got = query_rewards(labels, answers)
        assert got.shape == (n,)
        np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=f"trial {trial}")


def test_bad_labels_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="query 1 has label"):
        query_rewards([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        query_rewards([0, 1], [0.1])


def test_reward_proxy_over_a_set() -> None:
    out = reward_proxy([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5])  # always 0.5 -> always 0
    assert out == {"accuracy": 0.5, "mcc": 0.0, "reward_proxy": pytest.approx(0.25**3), "n": 4}
    out = reward_proxy([0, 1, 1, 1], [0.2, 0.9, 0.7, 0.4])
    mcc = matthews_corrcoef([0, 1, 1, 1], [0, 1, 1, 0])
    assert out["reward_proxy"] == pytest.approx((0.5 * mcc + 0.5 * 0.75) ** 3)
