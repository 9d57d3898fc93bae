"""Data-parallel training: one model trained by N processes with DistributedDataParallel.

`fit_distributed` is what the training node calls when `training.distributed` asks for more
than one process. It launches the workers with torch.distributed's elastic launcher (what
`torchrun` runs), on this machine or, with `nodes` > 1, on several joined by a rendezvous:

- each worker reads the split's samples and events from the catalog's parquet files and keeps
  its shard of the training samples (every `world_size`-th row of a seeded permutation, wrapped
  so all shards hold the same number and every rank takes the same number of steps); every
  process holds all events (`training.memory_budget_mb` does not apply here);
- each step every rank trains on `batch_size / world_size` samples of its shard and DDP
  averages the gradients: one step of the global batch `training.batch_size`;
- rank 0 scores the validation split and broadcasts the AUC, so every rank takes the same
  early-stopping decision; rank 0's best state (broadcast to every machine) is what the node
  returns, once, and Kedro writes it through the catalog as usual. Every rank's parameters must
  agree at the end (a fingerprint each), else the node fails.

Gloo on the CPU, NCCL on GPUs (one per process). Plain torch.distributed, no Kedro here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from attention_ctr.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedConfig:
    """`training.distributed`: processes per machine, machines, and how they meet."""

    processes: int = 1  # workers on this machine (GPUs: at most one per GPU)
    nodes: int = 1  # machines; > 1 needs the same run on each, meeting at `rendezvous_endpoint`
    rendezvous_endpoint: str = "localhost:0"  # host:port of the c10d store (0: any free port)
    run_id: str = ""  # the same on every machine of one job ("" : a fresh one, one machine)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | gloo | nccl
    timeout_seconds: int = 900  # how long the rendezvous waits for every machine

    @classmethod
    def from_params(cls, params: dict | None) -> DistributedConfig:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise InputError(
                f"Unknown parameter(s) training.distributed.{sorted(unknown)}; expected some of "
                f"{sorted(known)}"
            )
        config = cls(**params)
        for name in ("processes", "nodes"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"Parameter training.distributed.{name} must be an integer >= 1")
        if config.backend not in {"auto", "gloo", "nccl"}:
            raise InputError("Parameter training.distributed.backend must be auto, gloo or nccl")
        if config.nodes > 1 and (not config.run_id or config.rendezvous_endpoint.endswith(":0")):
            raise InputError(
                "Parameters training.distributed.run_id and rendezvous_endpoint (host:port, the "
                "same on every machine) are needed when training.distributed.nodes > 1"
            )
        return config

    @property
    def enabled(self) -> bool:
        return self.processes * self.nodes > 1


def shard_rows(count: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """Rank `rank`'s rows of `count`: every `world_size`-th of a seeded permutation (as torch's
    DistributedSampler deals them; a split's rows come in patterns, e.g. each positive next to
    its negatives, that a plain stride would hand to one rank), wrapped around at the end so
    that every shard holds ceil(count / world_size) rows."""
    per_rank = -(-count // world_size)
    order = np.random.default_rng(seed).permutation(count)
    return order[(rank + world_size * np.arange(per_rank)) % count] if count else order


def fit_distributed(
    model: nn.Module,
    train_samples,
    validation_samples,
    events,
    feature_spec: dict,
    item_frequency: torch.Tensor,
    config,
) -> tuple[nn.Module, pd.DataFrame]:
    """Train `model` like `training.fit`, in `config.distributed` processes; the best model
    (on the CPU, in eval mode) and rank 0's per-epoch history. The splits and events are
    parquet tables (`attention_ctr.datasets.ParquetTable`): each worker reads them from their
    files."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from attention_ctr.training import pick_device

    settings = config.distributed
    world_size = settings.processes * settings.nodes
    if config.batch_size % world_size:
        raise InputError(
            f"Parameter training.batch_size ({config.batch_size}) must be a multiple of the "
            f"{world_size} training processes (training.distributed)"
        )
    device = pick_device(config.device)
    if device.type == "cuda" and settings.processes > torch.cuda.device_count():
        raise InputError(
            f"Parameter training.distributed.processes is {settings.processes}, but this machine "
            f"has {torch.cuda.device_count()} GPU(s): one process per GPU"
        )
    if device.type == "cpu" and settings.backend == "nccl":
        raise InputError(
            "Parameter training.distributed.backend is nccl, which needs GPUs, but training runs "
            "on the CPU: use gloo (or auto)"
        )
    paths = {
        "train_samples": str(train_samples.path),
        "validation_samples": str(validation_samples.path),
        "events": str(events.path),
    }
    with tempfile.TemporaryDirectory(prefix="attention_ctr_ddp_") as scratch:
        folder = Path(scratch)
        torch.save({"model": model, "item_frequency": item_frequency}, folder / "model.pt")
        launch = LaunchConfig(
            min_nodes=settings.nodes,
            max_nodes=settings.nodes,
            nproc_per_node=settings.processes,
            run_id=settings.run_id or f"attention_ctr_{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint=settings.rendezvous_endpoint,
            rdzv_configs={"timeout": settings.timeout_seconds},
            max_restarts=0,
            start_method="spawn",
        )
        logger.info(
            "Training %s in %d processes (%d per machine, %d machine(s))",
            model.name,
            world_size,
            settings.processes,
            settings.nodes,
        )
        results = elastic_launch(launch, _worker)(str(folder), paths, feature_spec, config)
    fingerprints = {rank: result[0] for rank, result in results.items()}
    if len(set(fingerprints.values())) > 1:  # DDP keeps parameters in step: it did not here
        raise RuntimeError(f"Training processes ended with different parameters: {fingerprints}")
    # rank 0's state (its buffers too); on another machine, the one broadcast from rank 0
    _, state, history = next(result for result in results.values() if result[1] is not None)
    model.load_state_dict(state)
    return model.cpu().eval(), history


def _device(config, local_rank: int) -> torch.device:
    from attention_ctr.training import pick_device

    device = pick_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def _fingerprint(model: nn.Module) -> str:
    """A digest of the parameters' values: equal across ranks that DDP kept in step."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _worker(
    folder: str, paths: dict[str, str], feature_spec: dict, config
) -> tuple[str, dict | None, pd.DataFrame | None]:
    """One rank: join the group, train on this rank's shard; return its parameters'
    fingerprint, and on each machine's local rank 0 rank 0's state and history (broadcast, so
    every machine's catalog gets rank 0's model, buffers included)."""
    from attention_ctr.datasets.parquet_table_dataset import ParquetTable
    from attention_ctr.sequences import SampleTensors
    from attention_ctr.training import fit, seed_everything

    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    device = _device(config, local_rank)
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device.type == "cpu":  # the cores this process may use, shared out
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // local_world))
        if rank == 0:  # spawned: Kedro's logging config is not here; rank 0 reports the epochs
            logging.basicConfig(level=logging.INFO, format="%(asctime)s rank 0: %(message)s")
        seed_everything(config.seed + rank)  # dropout: a different stream per rank
        saved = torch.load(Path(folder) / "model.pt", weights_only=False)
        # ParquetTable: a file, or Spark's part files in row order (`hist_end` points by row)
        events = ParquetTable(paths["events"]).read()
        train = ParquetTable(paths["train_samples"]).read()
        rows = shard_rows(len(train), rank, world_size, config.seed)
        shard = train.iloc[rows].reset_index(drop=True)
        train_tensors = SampleTensors(shard, events, feature_spec, device)
        validation = None
        if rank == 0:
            validation_samples = ParquetTable(paths["validation_samples"]).read()
            validation = SampleTensors(validation_samples, events, feature_spec, device)
        model, history = fit(
            saved["model"],
            train_tensors,
            validation,
            config,
            saved["item_frequency"].to(device),
        )
        fingerprint = _fingerprint(model)
        holder = [(model.state_dict(), history) if rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        state, history = holder[0] if local_rank == 0 else (None, None)
        return fingerprint, state, history
    finally:
        dist.destroy_process_group()
