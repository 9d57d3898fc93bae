"""Eager torch against onnxruntime on the same CPU batches."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from attention_ctr.onnx_export import OUTPUT_NAME, export_onnx, onnx_feed
from attention_ctr.runtime import onnx_session


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare_runtimes(model: nn.Module, batches: list[dict], threads: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds of eager torch and of onnxruntime over `batches`, and the max
    abs difference of their logits.

    The model is exported in memory with `export_onnx`; both runtimes use `threads` threads.
    """
    model = model.cpu().eval()
    session = onnx_session(export_onnx(model), threads)
    feeds = [onnx_feed(session, batch) for batch in batches]  # conversion is not timed

    def run_torch() -> list[torch.Tensor]:
        return [model(batch) for batch in batches]

    def run_onnx() -> list[np.ndarray]:
        return [session.run([OUTPUT_NAME], feed)[0] for feed in feeds]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            # Untimed first passes: warm-up, and the outputs for the parity figure.
            torch_logits = torch.cat(run_torch()).numpy()
            onnx_logits = np.concatenate(run_onnx())
            # Interleaved passes, best of each: on a shared host noise only ever adds time,
            # and interleaving exposes both runtimes to the same load.
            timings = [(_seconds(run_torch), _seconds(run_onnx)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(previous_threads)
    torch_seconds, onnx_seconds = np.min(timings, axis=0)
    return {
        "torch_seconds": float(torch_seconds),
        "onnxruntime_seconds": float(onnx_seconds),
        "onnx_max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
    }
