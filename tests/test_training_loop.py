"""The training loop's CPU settings: allocator tuning and the bf16 autocast check."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import pytest
import torch

from attention_ctr.training import keep_freed_memory_for_reuse


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_freed_activations_are_reused_without_page_faults():
    """After tuning, freeing and reallocating 8 MB activations no longer faults pages back in."""
    assert keep_freed_memory_for_reuse()
    assert keep_freed_memory_for_reuse()  # idempotent

    def faults_while_reallocating(elements: int, times: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            torch.ones(elements).add_(1.0)  # freed at the end of each statement
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_while_reallocating(2_000_000, 50)  # 8 MB each; grows the heap once
    # Untuned, glibc maps most of these afresh: about 39,000 faults here.
    assert faults_while_reallocating(2_000_000, 50) < 2_000


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_blocks_above_the_mmap_ceiling_come_from_the_heap():
    """A 200 MB activation (above glibc's 32 MB mmap ceiling, and larger than the free top of
    the heap) is not mapped afresh: it comes from the heap, like smaller ones (mapped bytes,
    glibc's `mallinfo2().hblkhd`, stay put)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    assert keep_freed_memory_for_reuse()
    before = libc.mallinfo2().hblkhd
    activation = torch.ones(50_000_000)  # 200 MB
    assert libc.mallinfo2().hblkhd - before < 1 << 20
    del activation


@pytest.mark.parametrize("amx", [False, True], ids=["no AMX", "AMX"])
def test_bf16_on_cpu_warns_without_amx(amx, monkeypatch, caplog):
    """bf16 autocast on the CPU pays off with AMX; without it training says it may be slower."""
    from attention_ctr import training

    monkeypatch.setattr(training, "_cpu_has_amx", lambda: amx)
    config = training.TrainingConfig(device="cpu", bf16_on_cpu=True)
    with caplog.at_level("WARNING", logger=training.logger.name):
        training._check_cpu_bf16(torch.device("cpu"), config)
    assert ("no AMX" in caplog.text) == (not amx)
