"""The training loop's CPU settings: allocator tuning, the bf16 autocast check and lazy Adam
for large embedding tables."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import pytest
import torch

from attention_ctr import training
from attention_ctr.errors import InputError
from attention_ctr.models import build_model
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
    monkeypatch.setattr(training, "_cpu_has_amx", lambda: amx)
    config = training.TrainingConfig(device="cpu", bf16_on_cpu=True)
    with caplog.at_level("WARNING", logger=training.logger.name):
        training._check_cpu_bf16(torch.device("cpu"), config)
    assert ("no AMX" in caplog.text) == (not amx)


def _din():
    torch.manual_seed(0)
    return build_model(
        "din", n_items=50, n_categories=5, n_behaviors=2, n_time_gap_buckets=4, max_history=4
    )


def _batch(items: list[int]) -> dict[str, torch.Tensor]:
    targets = torch.tensor(items)
    return {
        "target_item": targets,
        "target_category": torch.ones_like(targets),
        "hist_item": targets[:, None].repeat(1, 2),
        "hist_category": torch.ones(len(items), 2, dtype=torch.long),
        "hist_behavior": torch.ones(len(items), 2, dtype=torch.long),
        "mask": torch.ones(len(items), 2, dtype=torch.bool),
    }


@pytest.mark.parametrize("lazy_rows", [None, 51], ids=["dense", "lazy"])
def test_lazy_adam_moves_only_the_rows_a_batch_looks_up(lazy_rows):
    """With lazy Adam (tables of >= `lazy_embedding_rows` rows) an item row seen in one step
    stays put in the next step that does not look it up; dense Adam's momentum moves it."""
    model = _din()
    config = training.TrainingConfig(lazy_embedding_rows=lazy_rows)
    tables = training._lazy_tables(model, config, torch.device("cpu"), distributed=False)
    assert tables == ([] if lazy_rows is None else [model.item_embedding])
    for table in tables:
        table.sparse = True
    optimizers = training._optimizers(model, config, tables)
    weight = model.item_embedding.weight
    labels = torch.tensor([1.0, 0.0])
    rows = []
    for items in ([3, 4], [7, 8]):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        training.batch_losses(model, _batch(items), labels, torch.ones(51))[2].backward()
        for optimizer in optimizers:
            optimizer.step()
        rows.append(weight[3].detach().clone())
    assert weight.grad.is_sparse == (lazy_rows is not None)
    assert torch.equal(rows[0], rows[1]) == (lazy_rows is not None)


def test_lazy_adam_is_for_eager_one_process_cpu_training():
    """Data-parallel, compiled and GPU training keep every table dense."""
    model, cpu = _din(), torch.device("cpu")
    config = training.TrainingConfig(lazy_embedding_rows=6)
    lazy = training._lazy_tables(model, config, cpu, distributed=False)
    assert lazy == [model.item_embedding, model.category_embedding]
    assert training._lazy_tables(model, config, cpu, distributed=True) == []
    assert training._lazy_tables(model, config, torch.device("cuda"), distributed=False) == []
    compiled = training.TrainingConfig(lazy_embedding_rows=6, compile=True)
    assert training._lazy_tables(model, compiled, cpu, distributed=False) == []


def test_lazy_adam_refuses_weight_decay_and_bad_row_counts():
    config = training.TrainingConfig(lazy_embedding_rows=10, weight_decay=1e-4)
    with pytest.raises(InputError, match="training.weight_decay is 0.0001.*lazy_embedding_rows"):
        training._lazy_tables(_din(), config, torch.device("cpu"), distributed=False)
    # data-parallel training keeps dense Adam, so weight decay is fine there
    assert training._lazy_tables(_din(), config, torch.device("cpu"), distributed=True) == []
    for rows in (0, -5, 2.5, True, "many"):
        with pytest.raises(InputError, match="training.lazy_embedding_rows"):
            training.TrainingConfig.from_params({"lazy_embedding_rows": rows})
