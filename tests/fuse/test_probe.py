"""The logistic-regression probe: C chosen on validation, repeated rows fitted once."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from fuse.probe import PROBE_C_GRID, fit_probe


def repeated_reports(vectors=40, copies=5, width=6, seed=0):
    """Report-only inputs: each vector repeated for the images of its report."""
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 2, vectors)
    unique = generator.normal(0, 1, (vectors, width)) + 0.8 * labels[:, None]
    order = generator.permutation(vectors * copies)
    features = np.repeat(unique, copies, axis=0)[order].astype(np.float32)
    return torch.from_numpy(features), torch.from_numpy(np.repeat(labels, copies)[order])


def sklearn_on_every_row(features, labels, train, c):
    probe = LogisticRegression(C=c, max_iter=2000, tol=1e-8)
    probe.fit(features[train].double().numpy(), labels[train].numpy())
    return probe.predict_proba(features.double().numpy())


def test_c_is_the_grid_value_with_the_lowest_validation_loss():
    features, labels = repeated_reports()
    train, val = torch.arange(0, 150), torch.arange(150, 200)
    result = fit_probe([features[:, :3], features[:, 3:]], labels, train, val, seed=0)
    losses = {
        c: log_loss(labels[val].numpy(), sklearn_on_every_row(features, labels, train, c)[val])
        for c in PROBE_C_GRID
    }
    assert result.c == min(losses, key=losses.get)
    assert result.val_loss == pytest.approx(losses[result.c], abs=1e-4)
    assert result.predict_proba(features.numpy()).shape == (200, 2)


def test_repeated_rows_fitted_once_give_the_fit_on_every_row():
    features, labels = repeated_reports()
    train, val = torch.arange(0, 150), torch.arange(150, 200)
    result = fit_probe([features], labels, train, val, seed=0)
    expected = sklearn_on_every_row(features, labels, train, result.c)
    np.testing.assert_allclose(result.predict_proba(features.numpy()), expected, atol=2e-3)


def test_one_vector_under_two_labels_is_fitted_row_by_row():
    features, labels = repeated_reports(vectors=20, copies=2)
    features[1], labels[0], labels[1] = features[0], 0, 1  # same vector, both classes
    train, val = torch.arange(0, 30), torch.arange(30, 40)
    result = fit_probe([features], labels, train, val, seed=0)
    expected = sklearn_on_every_row(features, labels, train, result.c)
    np.testing.assert_allclose(result.predict_proba(features.numpy()), expected, atol=2e-3)
