"""Benchmark: training samples per second of every model, with the validation AUC it reached.

    python benchmarks/training.py                      # batch 256 and 2048, 1 epoch each
    python benchmarks/training.py --batch-sizes 256 --epochs 2 --models din dien
    python benchmarks/training.py --models din dien --fast-models --repeats 3  # the ratio
    python benchmarks/training.py --item-rows 40000 400000 4000000  # dense vs lazy Adam

Features come from the real ingestion and feature_engineering pipelines on the synthetic
default (in a temporary copy of the project); each model is then trained with the project's
training loop at the fixed size of the targets: history length 50, embedding 32 for items and
for categories, attention unit 80-40, MLP 200-80. Throughput counts forward, backward and
optimiser step over whole epochs (batch gathering included). Targets on 2 CPU cores:
DIN >= 17,000 samples/s, DIEN <= 2.5x DIN's cost per sample, BST >= 5,000 samples/s.

A shared VM's speed drifts by 20% and more within minutes, so one run of DIN then one of DIEN
can misstate their ratio: `--repeats N` runs every model N times in turn (round-robin) and
reports each one's median rate, and the ratio from those. What it prints is also written to
benchmarks/results/training.md, under the command, date and machine.

`--item-rows N ...` measures instead what the item table's size costs a DIN step on the CPU
(float32, batch 256; `--models`, `--batch-sizes` and the variants above do not apply): the
same samples with the table widened to N rows (the extra rows are never looked up, like most
of a large catalogue's items in any one batch), eager under dense Adam and under lazy Adam
(`training.lazy_embedding_rows`), and compiled, which keeps dense Adam. It writes
benchmarks/results/training_item_rows.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import HISTORY, PROJECT_ROOT, RESULTS, build_features, fixed_size, recorded
from kedro.config import OmegaConfigLoader

from attention_ctr.models import build_model
from attention_ctr.pipelines.training.nodes import training_config
from attention_ctr.sequences import SampleTensors
from attention_ctr.settings import CONFIG_LOADER_ARGS
from attention_ctr.training import (
    TrainingConfig,
    fit,
    has_cxx_compiler,
    pick_device,
    seed_everything,
)


def recurrence_kernel() -> str:
    """Which build of the optional kernel DIEN's CPU training takes, and its matmuls."""
    try:
        import attention_ctr_kernels as kernels
    except ImportError:
        return "not installed (pip install --no-build-isolation ./kernels)"
    if not kernels.available():
        return "off"
    return f"{kernels.variant()} build, {kernels.matmul_backend()} matmuls"


def project_length_windows(names: list[str]) -> dict[str, int]:
    """`training.length_window` as the project trains each model (conf/base, local on top)."""
    parameters = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **CONFIG_LOADER_ARGS)["parameters"]
    return {
        name: training_config(parameters["training"], parameters.get(name, {})).length_window
        for name in names
    }


def time_item_rows(rows_list, sizes, train, validation, device, epochs: int) -> int:
    """DIN's samples/s with an item table of each size: eager under dense and under lazy Adam,
    and compiled (which keeps dense Adam) when there is a C++ compiler."""
    # (name, compiled, lazy_embedding_rows = the table's rows): compiled training keeps
    # dense Adam whatever that setting says
    variants = [("eager, dense Adam", False, False), ("eager, lazy Adam", False, True)]
    if has_cxx_compiler():
        variants.append(("compiled, dense", True, True))
    for rows in rows_list:
        widened = {**sizes, "n_items": max(sizes["n_items"], rows - 1)}
        for variant, compiled, lazy in variants:
            seed_everything(2024)
            model = build_model("din", **widened, **fixed_size("din"))
            config = TrainingConfig(
                device=str(device),
                # compiled: one extra epoch, timed alone (the first absorbs the compilation)
                epochs=epochs + compiled,
                patience=epochs + 2,
                batch_size=256,
                bf16_on_gpu=False,
                compile=compiled,
                progress_bar=False,
                lazy_embedding_rows=rows if lazy else None,
            )
            _, history = fit(model, train, validation, config)
            print(
                f"din {variant:18s} item table {widened['n_items'] + 1:>10,d} rows "
                f"{history['train_samples_per_second'].iloc[-1]:>9,.0f} samples/s   "
                f"val AUC {history['validation_auc'].iloc[epochs - 1]:.4f}",
                flush=True,
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pooling", "din", "dien", "bst"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 2048])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every model this many times in turn; report the median rate of each",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--length-window",
        type=int,
        default=None,
        help="training.length_window for every model (batches per length-sorted window, "
        "0 = plain shuffle); default: each model's own from conf/base/parameters_training.yml",
    )
    parser.add_argument(
        "--fast-models",
        nargs="*",
        default=["pooling", "din", "dien", "bst"],
        help="also train these with bf16 autocast (training.bf16_on_cpu / bf16_on_gpu)",
    )
    parser.add_argument(
        "--compile-models",
        nargs="*",
        default=["pooling", "din"],
        help="of the fast models, these also with training.compile (it slows DIEN and BST)",
    )
    parser.add_argument(
        "--item-rows",
        nargs="+",
        type=int,
        help="only time DIN with its item table widened to these many rows, dense vs lazy Adam",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    if args.item_rows and device.type != "cpu":
        parser.error("--item-rows measures lazy Adam, which is for the CPU: add --device cpu")

    tables = build_features(
        {"ingestion.synthetic.events": args.events, "feature_engineering.max_history": HISTORY},
        ("feature_spec", "events@pandas", "train_samples@pandas", "validation_samples@pandas"),
    )
    spec, events = tables["feature_spec"], tables["events"]
    train_samples, validation_samples = tables["train_samples"], tables["validation_samples"]

    train = SampleTensors(train_samples, events, spec, device)
    validation = SampleTensors(validation_samples, events, spec, device)
    sizes = {
        key: spec[key]
        for key in ("n_items", "n_categories", "n_behaviors", "n_time_gap_buckets", "max_history")
    }
    print(
        f"\ndevice {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"recurrence kernel: {recurrence_kernel()}; "
        f"{len(train):,} training samples, history <= {spec['max_history']}"
    )
    if args.item_rows:
        return time_item_rows(args.item_rows, sizes, train, validation, device, args.epochs)
    print(
        f"{'model':8s} {'variant':14s} {'batch':>6s} {'window':>6s} {'samples/s':>11s} "
        f"{'val AUC':>8s} {'params':>10s}"
    )
    windows = (
        project_length_windows(args.models)
        if args.length_window is None
        else dict.fromkeys(args.models, args.length_window)
    )
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    all_rates: dict[tuple[str, str, int], list[float]] = {}
    aucs: dict[tuple[str, str, int], float] = {}
    runs = [(name, "eager fp32") for name in args.models] + [
        (name, "compiled bf16" if name in args.compile_models else "bf16")
        for name in args.models
        if name in args.fast_models
    ]
    for batch_size in [size for _ in range(args.repeats) for size in args.batch_sizes]:
        for name, variant in runs:
            seed_everything(2024)
            model = build_model(name, **sizes, **fixed_size(name))
            compiled, bf16 = variant == "compiled bf16", variant != "eager fp32"
            window = windows[name]
            config = TrainingConfig(
                device=str(device),
                # One extra epoch, timed alone: the first absorbs the compilation. AUC is read
                # after `epochs` epochs, as for eager (same seed, same batches).
                epochs=args.epochs + compiled,
                batch_size=batch_size,
                length_window=window,
                progress_bar=False,
                patience=args.epochs + 1,
                compile=compiled,
                bf16_on_cpu=bf16,
                bf16_on_gpu=bf16,
            )
            _, history = fit(model, train, validation, config)
            rate = float(history["train_samples_per_second"].iloc[-1])
            all_rates.setdefault((name, variant, batch_size), []).append(rate)
            aucs[(name, variant, batch_size)] = history["validation_auc"].iloc[args.epochs - 1]
            parameters = sum(p.numel() for p in model.parameters())
            print(
                f"{name:8s} {variant:14s} {batch_size:6d} {window:6d} {rate:11,.0f} "
                f"{aucs[(name, variant, batch_size)]:8.4f} {parameters:10,d}",
                flush=True,
            )
    rates = {key: statistics.median(values) for key, values in all_rates.items()}
    if args.repeats > 1:
        print(f"\nmedian of {args.repeats} runs each (samples/s: every run's)")
        for (name, variant, batch_size), rate in rates.items():
            runs_text = ", ".join(f"{r:,.0f}" for r in all_rates[(name, variant, batch_size)])
            print(
                f"{name:8s} {variant:14s} {batch_size:6d} {rate:11,.0f} "
                f"{aucs[(name, variant, batch_size)]:8.4f}  ({runs_text})"
            )
    for batch_size in args.batch_sizes:
        din = {v: r for (m, v, b), r in rates.items() if m == "din" and b == batch_size}
        dien = {v: r for (m, v, b), r in rates.items() if m == "dien" and b == batch_size}
        if din and dien:
            print(
                f"DIEN/DIN cost per sample at batch {batch_size}: "
                f"{din.get('eager fp32', 0) / dien.get('eager fp32', 1):.2f}x (both eager fp32), "
                f"{max(din.values()) / max(dien.values()):.2f}x (each model's fastest variant)"
            )
    return 0


if __name__ == "__main__":
    # what it printed also goes to benchmarks/results/, under the command and machine
    name = "training_item_rows.md" if "--item-rows" in sys.argv else "training.md"
    with recorded(RESULTS / name):
        status = main()
    sys.exit(status)
