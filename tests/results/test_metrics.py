import numpy as np
import pytest

from bench.metrics import average_incremental_accuracy, backward_transfer, final_accuracy, forgetting, task_accuracies

nan = np.nan
R = np.array(
    [
        [0.90, nan, nan],
        [0.70, 0.80, nan],
        [0.50, 0.60, 0.95],
    ]
)


def test_forgetting_is_chaudhry():
    # j=0: max(0.90, 0.70) - 0.50 = 0.40; j=1: max(0.80) - 0.60 = 0.20 -> mean 0.30
    assert forgetting(R) == pytest.approx(0.30)


def test_forgetting_uses_best_earlier_not_first():
    R2 = np.array([[0.5, nan, nan], [0.8, 0.7, nan], [0.6, 0.7, 0.9]])
    # j=0: max(0.5, 0.8) - 0.6 = 0.2 ; j=1: 0.7 - 0.7 = 0 -> 0.1
    assert forgetting(R2) == pytest.approx(0.1)


def test_bwt_is_gem():
    # j=0: 0.50 - 0.90 = -0.40 ; j=1: 0.60 - 0.80 = -0.20 -> -0.30
    assert backward_transfer(R) == pytest.approx(-0.30)
    R3 = np.array([[0.5, nan], [0.7, 0.9]])
    assert backward_transfer(R3) == pytest.approx(0.2)


def test_single_task_has_no_forgetting_defined():
    assert np.isnan(forgetting(np.array([[0.9]])))
    assert np.isnan(backward_transfer(np.array([[0.9]])))


def test_final_and_average_incremental():
    seen = np.array([0.9, 0.75, 0.6])
    assert final_accuracy(seen) == pytest.approx(0.6)
    assert average_incremental_accuracy(seen) == pytest.approx(0.75)


def test_task_accuracies_sample_weighted():
    # task 0 = labels {0,1}, task 1 = label {2}; 3 samples of task 0 (2 right), 1 of task 1 (right)
    task_of_label = np.array([0, 0, 1])
    y = np.array([0, 1, 1, 2])
    pred = np.array([0, 1, 0, 2])
    acc, per_task = task_accuracies(pred, y, task_of_label[y], 2)
    assert acc == pytest.approx(3 / 4)  # sample-weighted, not the mean of 2/3 and 1
    assert per_task == pytest.approx([2 / 3, 1.0])
