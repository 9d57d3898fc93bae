"""The training loop's CPU allocator tuning."""

from __future__ import annotations

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

    def faults_while_reallocating() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            torch.ones(2_000_000).add_(1.0)  # 8 MB, freed at the end of each statement
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_while_reallocating()  # grows the heap once
    # Untuned, glibc maps most of these afresh: about 39,000 faults here.
    assert faults_while_reallocating() < 2_000
