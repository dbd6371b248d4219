import math

import numpy as np

from pipeline.metrics import classification_metrics


def test_metrics_of_a_known_confusion():
    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.4])  # one error in each class
    result = classification_metrics(labels, np.stack([1 - positive, positive], 1), ("VCD", "GC"))
    assert result["accuracy"] == 4 / 6
    assert result["recall_VCD"] == 2 / 3 and result["recall_GC"] == 2 / 3
    assert result["precision"] == 2 / 3 and math.isclose(result["f1"], 2 / 3)
    # 8 of the 9 (positive, negative) pairs are ordered right
    assert math.isclose(result["auc"], 8 / 9)
    assert result["n"] == 6


def test_auc_is_nan_with_one_class():
    result = classification_metrics(
        np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ("A", "B")
    )
    assert math.isnan(result["auc"])
