"""The serving module stands on numpy, pandas and onnxruntime alone: no torch, Kedro or
scikit-learn, and the same numbers as the torch code it replaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from attention_ctr.runtime import sigmoid, time_gap_buckets
from attention_ctr.sequences import time_gap_bucket

FORBIDDEN = ("torch", "sklearn", "kedro", "kedro_datasets", "matplotlib", "onnx")


def test_importing_serving_loads_no_training_stack():
    code = (
        "import json, sys; import attention_ctr.serving; "
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_time_gap_buckets_match_the_torch_bucketing():
    edges = np.array([60, 3600, 86400, 604800], dtype=np.int64)
    rng = np.random.default_rng(0)
    gaps = np.concatenate(
        [rng.integers(0, 2 * 604800, 10_000), edges, edges - 1, edges + 1, [0, 10**12]]
    ).astype(np.int64)
    expected = time_gap_bucket(torch.from_numpy(gaps), torch.from_numpy(edges)).numpy()
    buckets = time_gap_buckets(gaps, edges)
    assert buckets.dtype == expected.dtype == np.int64
    np.testing.assert_array_equal(buckets, expected)
    np.testing.assert_array_equal(time_gap_buckets(gaps, []), np.ones(len(gaps), np.int64))


def test_sigmoid_matches_torch_within_one_ulp_and_never_overflows():
    rng = np.random.default_rng(0)
    logits = np.concatenate(
        [rng.normal(0, 8, 100_000), [0.0, -0.0, 88.7, -88.7, 104.0, -104.0, 1e4, -1e4]]
    ).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        probabilities = sigmoid(logits)
    assert probabilities.dtype == np.float32
    expected = torch.sigmoid(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=2**-23, atol=2**-24)
    # Correctly rounded: torch in float64, rounded once, is the same to the last bit.
    exact = torch.sigmoid(torch.from_numpy(logits.astype(np.float64))).numpy().astype(np.float32)
    np.testing.assert_array_equal(probabilities, exact)
    assert probabilities[-1] == 0.0 and probabilities[-2] == 1.0
