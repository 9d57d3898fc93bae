"""What scoring an exported graph needs at run time, with numpy and onnxruntime only (no torch).

`attention_ctr.serving` is built on this module so that a server installs the package without
its `pipelines` extra (torch, Kedro, scikit-learn, ...). Each function is the numpy twin of
what training and evaluation do in torch:

- `onnx_session`: the CPU session every part of the project scores with;
- `time_gap_buckets`: `attention_ctr.sequences.time_gap_bucket` (`torch.bucketize(gaps, edges,
  right=True) + 1`), the same int64 bucket ids;
- `sigmoid`: `torch.sigmoid` on float32 logits, computed in float64 and rounded once to
  float32, so it is the correctly rounded value and never overflows; torch's vectorised float32
  kernel may differ from it by one unit in the last place (at most 6e-8).
"""

from __future__ import annotations

import numpy as np
import onnxruntime


def onnx_session(graph: bytes, threads: int = 2) -> onnxruntime.InferenceSession:
    """A CPU session with a fixed thread count and no spinning (spinning threads skew latency)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        graph, sess_options=options, providers=["CPUExecutionProvider"]
    )


def time_gap_buckets(gap_seconds: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket ids of time gaps: 1 + number of edges <= gap (0 is kept for padding), int64."""
    edges = np.asarray(edges, dtype=np.int64)
    return np.searchsorted(edges, np.asarray(gap_seconds), side="right").astype(np.int64) + 1


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function of float32 logits, as float32 probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    small = np.exp(-np.abs(x))  # in (0, 1]: no overflow for any x
    return np.where(x >= 0, 1.0 / (1.0 + small), small / (1.0 + small)).astype(np.float32)
