"""The training loop, evaluation and cold-start fallback; plain PyTorch, no Kedro.

The loop is deliberately visible: batches come pre-tensorised from `SampleTensors`, the model
returns logits (and DIEN its auxiliary loss), the loss is BCE-with-logits, and early stopping
keeps the state with the best validation AUC.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from attention_ctr.distributed import DistributedConfig
from attention_ctr.errors import InputError
from attention_ctr.sequences import SampleStream, SampleTensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    device: str = "auto"
    seed: int = 2024
    epochs: int = 8
    patience: int = 2
    batch_size: int = 256
    eval_batch_size: int = 4096
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    bf16_on_gpu: bool = True
    bf16_on_cpu: bool = False
    compile: bool = False
    length_window: int = 0
    progress_bar: bool = True
    memory_budget_mb: float = 8192
    lazy_embedding_rows: int | None = 100_000
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @classmethod
    def from_params(cls, params: dict) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(
                f"Unknown training parameter(s) {sorted(unknown)}; expected some of {sorted(known)}"
            )
        distributed = DistributedConfig.from_params(params.get("distributed"))
        config = cls(**{**params, "distributed": distributed})
        if not config.memory_budget_mb > 0:
            raise InputError(
                f"Parameter training.memory_budget_mb is {config.memory_budget_mb}; expected "
                "megabytes > 0"
            )
        rows = config.lazy_embedding_rows
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise InputError(
                f"Parameter training.lazy_embedding_rows is {rows!r}; expected a number of "
                "rows >= 1, or null (never)"
            )
        return config


def pick_device(requested: str) -> torch.device:
    """`auto` takes CUDA when there is a GPU, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("Parameter training.device is 'cuda' but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory_for_reuse() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel after every op.

    A training step allocates and frees dozens of multi-MB activations. By default glibc serves
    each from a fresh mmap (or trims the heap after it), so every step pays thousands of page
    faults zeroing the same memory again, a large share of a CPU step. Raising the mmap and
    trim thresholds keeps those blocks in the heap for the next step (what tcmalloc and jemalloc
    do by design). Blocks above glibc's largest mmap threshold (32 MB) would still be mapped
    and faulted in afresh every step (DIEN's auxiliary activations at large batches are that
    big), so mmap is turned off and every block comes from the heap. The price is a process
    that gives memory back to the OS later, and a somewhat higher peak RSS. Returns whether
    the allocator was tuned (glibc only; a no-op elsewhere).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or sys.platform != "linux":
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    _ALLOCATOR_TUNED = bool(
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
        and mallopt(m_mmap_max, 0)  # and no mmap at all, for the blocks above it
        and mallopt(m_trim_threshold, 1 << 30)
        and mallopt(m_top_pad, 64 << 20)
    )
    return _ALLOCATOR_TUNED


_ALLOCATOR_TUNED = False


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH ($CXX, g++, c++ or clang++): torch.compile builds
    its CPU kernels with one."""
    names = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
    return any(shutil.which(name) for name in names if name)


def _autocast(device: torch.device, config: TrainingConfig):
    if device.type == "cuda" and config.bf16_on_gpu:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and config.bf16_on_cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _check_cpu_bf16(device: torch.device, config: TrainingConfig) -> None:
    if device.type == "cpu" and config.bf16_on_cpu and not torch.backends.mkldnn.is_available():
        raise ValueError("Parameter training.bf16_on_cpu needs a PyTorch build with oneDNN")
    if device.type == "cpu" and config.bf16_on_cpu and not _cpu_has_amx():
        logger.warning(
            "training.bf16_on_cpu: this CPU has no AMX, where bf16 matmuls pay off; without it "
            "they may run slower than float32 (DIEN does on an AMD EPYC with AVX512-BF16)"
        )


def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def batch_losses(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    item_frequency: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(click BCE, weighted auxiliary loss or None, total loss to minimise) for one batch."""
    logits, auxiliary = model.forward_with_auxiliary(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    total = loss if auxiliary is None else loss + auxiliary.float()
    if item_frequency is not None:  # DIN's mini-batch aware L2 (0 unless enabled)
        total = total + model.regularization(batch, item_frequency)
    return loss, auxiliary, total


@torch.no_grad()
def predict(
    model: nn.Module, tensors: SampleTensors, batch_size: int, autocast=nullcontext
) -> np.ndarray:
    """Click probabilities for every sample of a split, in the split's order.

    Batches are built from samples sorted by history length (then put back in order): in eval
    mode a prediction does not depend on its batch, and short batches are cheap.
    """
    model.eval()
    parts = []
    for chunk in tensors.chunks():
        scores = torch.empty(len(chunk), dtype=torch.float32)
        whole_chunk = max(1, math.ceil(len(chunk) / batch_size))
        for index in chunk.batch_indices(batch_size, length_window=whole_chunk):
            with autocast():
                logits = model(chunk.batch(index))
            scores[index.cpu()] = torch.sigmoid(logits.float()).cpu()
        parts.append(scores)
    return torch.cat(parts).numpy() if parts else np.empty(0, dtype=np.float32)


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC and logloss (scikit-learn); AUC is NaN when only one class is present."""
    both_classes = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probabilities)) if both_classes else math.nan,
        "logloss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


class _TrainingStep(nn.Module):
    """`batch_losses` as a module's forward: DistributedDataParallel syncs gradients of what runs
    inside its wrapped module's forward, and the step calls `forward_with_auxiliary` and the
    regularisation, not `forward`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, labels, item_frequency):
        return batch_losses(self.model, batch, labels, item_frequency)


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ranks(values: list[float]) -> list[float]:
    """`values` summed over the ranks of the process group (itself outside one)."""
    if not _in_process_group():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return total.cpu().tolist()


def _from_rank_zero(value):
    """Rank 0's `value` on every rank (itself outside a process group)."""
    if not _in_process_group():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _lazy_tables(model: nn.Module, config: TrainingConfig, device, distributed: bool) -> list:
    """The embedding tables that train with lazy Adam: those of at least
    `lazy_embedding_rows` rows, in eager one-process training on the CPU.

    Dense Adam updates every row of every table at every step, so on the CPU a DIN step slows
    with the size of the item table, while a lazy step costs about the same at any size
    (benchmarks/results/training_item_rows.md). Elsewhere tables stay dense: DDP's sparse
    gradients are gloo-only (not NCCL), sparse lookups break torch.compile's graph, and on a
    GPU the dense update is cheap.
    """
    rows = config.lazy_embedding_rows
    if rows is None or distributed or config.compile or device.type != "cpu":
        return []
    tables = [
        table
        for table in model.modules()
        if isinstance(table, nn.Embedding) and table.num_embeddings >= rows
    ]
    if tables and config.weight_decay:
        raise InputError(
            f"Parameter training.weight_decay is {config.weight_decay}, but tables of "
            f"{rows:,}+ rows get lazy Adam (training.lazy_embedding_rows), which has no weight "
            "decay: set weight_decay to 0 (DIN's l2_weight regularises the embeddings a batch "
            "uses) or lazy_embedding_rows to null"
        )
    for table in tables:
        logger.info("Lazy Adam for a %s-row embedding table", f"{table.num_embeddings:,}")
    return tables


def _optimizers(model: nn.Module, config: TrainingConfig, lazy_tables: list) -> list:
    """Fused Adam over the parameters, and SparseAdam (lazy Adam: only the rows a batch looks
    up move) over the weights of `lazy_tables`, whose lookups must be sparse."""
    lazy = [table.weight for table in lazy_tables]
    lazy_ids = {id(weight) for weight in lazy}
    dense = [p for p in model.parameters() if id(p) not in lazy_ids]
    # fused: one kernel over all parameters (CPU and CUDA) instead of a loop over tensors
    optimizers = [
        torch.optim.Adam(
            dense, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
    ]
    if lazy:
        optimizers.append(torch.optim.SparseAdam(lazy, lr=config.learning_rate))
    return optimizers


def _epoch_batches(train, batch_size: int, generator: torch.Generator, length_window: int):
    """One epoch's shuffled (batch, labels): chunk by chunk for a `SampleStream`."""
    for chunk in train.chunks(True, generator):
        yield from chunk.batches(batch_size, True, generator, length_window=length_window)


def fit(
    model: nn.Module,
    train: SampleTensors | SampleStream,
    validation: SampleTensors | SampleStream | None,
    config: TrainingConfig,
    item_frequency: torch.Tensor | None = None,
) -> tuple[nn.Module, pd.DataFrame]:
    """Train with early stopping on validation AUC; return the best model and per-epoch history.

    `train` and `validation` may be `SampleStream`s (read chunk by chunk from parquet): an
    epoch then visits the chunks in a random order and shuffles within each.

    Inside a torch.distributed process group (`attention_ctr.distributed`) each rank trains on
    its own shard `train` with `batch_size / world size` samples a step under
    DistributedDataParallel, and only rank 0 needs `validation`: it scores it and every rank
    takes its metrics.
    """
    device = train.device
    distributed = _in_process_group()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    batch_size = config.batch_size // world_size
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model.to(device)
    generator = torch.Generator().manual_seed(config.seed + rank)
    autocast = lambda: _autocast(device, config)  # noqa: E731
    _check_cpu_bf16(device, config)
    if config.compile and device.type == "cpu" and not has_cxx_compiler():
        raise ValueError(
            "Parameter training.compile needs a C++ compiler on the CPU (torch.compile builds "
            "its kernels with one): install g++ or set training.compile: false"
        )
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        step = DistributedDataParallel(_TrainingStep(model), device_ids=ids)
        step = torch.compile(step) if config.compile else step
        losses = lambda _model, batch, labels, frequency: step(batch, labels, frequency)  # noqa: E731
    else:
        # torch.compile fuses the elementwise work of forward and backward (Dice, masks,
        # gates) into a few kernels; it pays a one-off compile per model.
        losses = torch.compile(batch_losses) if config.compile else batch_losses
    lazy_tables = _lazy_tables(model, config, device, distributed)
    optimizers = _optimizers(model, config, lazy_tables)
    best_auc, best_state, stale, history = -math.inf, None, 0, []
    validation_labels = validation.label.cpu().numpy() if validation is not None else None

    # None: tqdm turns itself off off-terminal; one rank draws the bars
    show = None if config.progress_bar and rank == 0 else True
    epochs = tqdm(range(1, config.epochs + 1), desc=model.name, unit="epoch", disable=show)
    built = [table.sparse for table in lazy_tables]
    try:
        for table in lazy_tables:
            table.sparse = True
        for epoch in epochs:
            model.train()
            started = time.perf_counter()
            loss_sum, auxiliary_sum, seen = 0.0, 0.0, 0
            steps = math.ceil(len(train) / batch_size)
            bar = tqdm(
                _epoch_batches(train, batch_size, generator, config.length_window),
                total=steps,
                desc=f"{model.name} epoch {epoch}",
                disable=show,
                leave=False,
            )
            for batch, labels in bar:
                with autocast():
                    loss, auxiliary, total = losses(model, batch, labels, item_frequency)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                total.backward()
                for optimizer in optimizers:
                    optimizer.step()
                size = len(labels)
                seen += size
                loss_sum += loss.item() * size
                if auxiliary is not None:
                    auxiliary_sum += auxiliary.item() * size
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
            train_seconds = time.perf_counter() - started
            loss_sum, auxiliary_sum, seen = _all_ranks([loss_sum, auxiliary_sum, float(seen)])

            metrics = None
            if rank == 0:
                probabilities = predict(model, validation, config.eval_batch_size, autocast)
                metrics = score(validation_labels, probabilities)
            metrics = _from_rank_zero(metrics)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(seen, 1),
                    "train_auxiliary_loss": auxiliary_sum / max(seen, 1),
                    "validation_auc": metrics["auc"],
                    "validation_logloss": metrics["logloss"],
                    "train_seconds": train_seconds,
                    "train_samples_per_second": seen / train_seconds,
                }
            )
            logger.info(
                "%s epoch %d: loss %.4f, validation AUC %.4f, logloss %.4f, %.0f samples/s",
                model.name,
                epoch,
                history[-1]["train_loss"],
                metrics["auc"],
                metrics["logloss"],
                history[-1]["train_samples_per_second"],
            )
            epochs.set_postfix(
                loss=f"{history[-1]['train_loss']:.4f}", val_auc=f"{metrics['auc']:.4f}"
            )
            if metrics["auc"] > best_auc:
                best_auc, stale = metrics["auc"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    logger.info(
                        "%s: early stop after epoch %d (best AUC %.4f)", model.name, epoch, best_auc
                    )
                    break
    finally:
        for table, sparse in zip(lazy_tables, built):
            table.sparse = sparse  # the model leaves as it came
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu().eval(), pd.DataFrame(history)


@torch.no_grad()
def category_average(
    table: torch.Tensor, weights: pd.DataFrame, n_categories: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each category's frequency-weighted average of its warm items' rows of `table` [N, D].

    `weights` is feature engineering's `cold_start_weights` (category, item, weight). Returns
    the averages `[n_categories + 1, D]` (row c for category c; zero where a category has no
    warm items) and which categories have warm items `[n_categories + 1]` (bool).
    """
    average = torch.zeros(n_categories + 1, table.shape[1], dtype=table.dtype)
    category = torch.as_tensor(weights["category"].to_numpy(np.int64))
    contribution = (
        table[torch.as_tensor(weights["item"].to_numpy(np.int64))]
        * torch.as_tensor(weights["weight"].to_numpy(np.float32), dtype=table.dtype)[:, None]
    )
    average.index_add_(0, category, contribution)
    has_warm = torch.zeros(n_categories + 1, dtype=torch.bool)
    has_warm[category] = True
    return average, has_warm


@torch.no_grad()
def blend_toward_category(
    model: nn.Module,
    item_frequency: pd.DataFrame,
    cold_items: pd.DataFrame,
    weights: pd.DataFrame,
    k: float,
) -> nn.Module:
    """A copy of `model` with its item rows shrunk toward their category's average.

    Item i with n_i training behaviours in category c gets `(n_i * own + k * average_c) /
    (n_i + k)` (`k = 0`: its own row, unchanged); every item in `cold_items` (in no training
    sample: an untrained row) gets `average_c` whatever `k`. `average_c` is the
    frequency-weighted average of `weights` (feature engineering's `cold_start_weights`) over
    the trained rows; items of a category with no trained items keep their own rows.
    """
    if k < 0:
        raise ValueError(f"Parameter cold_start.blend_grid holds {k}; expected values >= 0")
    blended = copy.deepcopy(model)
    table = blended.item_embedding.weight
    n_categories = int(max(item_frequency["category"].to_numpy().max(initial=0), 0))
    average, has_warm = category_average(table, weights, n_categories)
    item = torch.as_tensor(item_frequency["item"].to_numpy(np.int64))
    category = torch.as_tensor(item_frequency["category"].to_numpy(np.int64))
    count = torch.as_tensor(item_frequency["train_count"].to_numpy(np.float64), dtype=table.dtype)
    own_share = torch.ones_like(count) if k == 0 else count / (count + k)
    never_trained = item_frequency["item"].isin(cold_items["item"]).to_numpy().copy()
    own_share[torch.from_numpy(never_trained)] = 0.0
    own_share = torch.where(has_warm[category], own_share, torch.ones_like(own_share))
    table[item] = own_share[:, None] * table[item] + (1 - own_share[:, None]) * average[category]
    return blended


def choose_blend(
    model: nn.Module,
    validation: SampleTensors | SampleStream,
    item_frequency: pd.DataFrame,
    cold_items: pd.DataFrame,
    weights: pd.DataFrame,
    grid: list[float],
    batch_size: int,
) -> dict:
    """The blend `k` of `grid` with the best validation AUC (ties: the smaller k), and every
    grid point's score. `grid` must hold 0 (no blend), so the choice never lowers the AUC."""
    grid = sorted({float(k) for k in grid})
    if 0.0 not in grid:
        raise ValueError(
            f"Parameter cold_start.blend_grid is {grid}; it must include 0 (no blend), the "
            "baseline a blend has to beat on validation"
        )
    labels = validation.label.cpu().numpy()
    scores = []
    for k in grid:
        blended = blend_toward_category(model, item_frequency, cold_items, weights, k)
        auc = score(labels, predict(blended.to(validation.device), validation, batch_size))["auc"]
        scores.append({"k": k, "validation_auc": auc})
    best = max(scores, key=lambda row: (row["validation_auc"], -row["k"]))
    return {
        "k": best["k"],
        "validation_auc": best["validation_auc"],
        "validation_auc_without_blend": scores[0]["validation_auc"],
        "grid": scores,
    }
