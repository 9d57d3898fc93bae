"""Benchmark: onnxruntime vs eager torch on the CPU for every model, as a serving fleet runs them.

    python benchmarks/serving.py                        # every model, 2 threads
    python benchmarks/serving.py --models din --threads 1 --repeats 500

Each model is built at the fixed size of the targets (history 50, embedding 32 for items and
for categories, attention unit 80-40, MLP 200-80; random weights, latency does not depend on
them) over --items items and --categories categories, given its category cold-start rows and
exported exactly as the export pipeline does (`add_cold_start_rows`, `export_onnx`).

- latency: one user's request, 100 candidates sharing a 50-behaviour history, p50 and p99
  over --repeats requests: eager torch (the history tiled to a [100, 50] batch), the batch
  graph on that same batch, the request graph (history [1, 50], `export_request_onnx`) and
  `Scorer` (raw ids in, probabilities out, cache off: encoding included, request graph);
- throughput: batches of 128 samples, each with its own full 50-behaviour history (eager torch
  vs the batch graph).

torch runs eagerly in inference mode with `torch.set_num_threads(--threads)`; onnxruntime with
the project's session (`onnx_session`: --threads intra-op threads, no spinning). Torch and
onnxruntime calls alternate, so a busy shared host slows both alike. Targets on 2 cores:
onnxruntime >= 2x eager torch; DIN p99 <= 2.5 ms at 100 x 50 and >= 50,000 samples/s at 128.
What it prints is also written to benchmarks/results/serving.md, under the command, date and
machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partial

import numpy as np
import pandas as pd
import torch
from _common import HISTORY, RESULTS, fixed_size, recorded

EDGES = [60, 300, 900, 3600, 10800, 21600, 43200, 86400, 172800, 345600, 604800, 2592000]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pooling", "din", "dien", "bst"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=300, help="timed requests per model")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=1_000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # tracer warnings of the export
    torch.set_num_threads(args.threads)

    from attention_ctr.bundle import add_cold_start_rows, build_serving_tables
    from attention_ctr.models import build_model, random_batch
    from attention_ctr.onnx_export import (
        export_onnx,
        export_request_onnx,
        onnx_feed,
        onnx_session,
    )
    from attention_ctr.pipelines.export.nodes import describe_serving
    from attention_ctr.serving import Scorer

    tables = _id_tables(args.items, args.categories)
    spec = {
        "n_items": args.items,
        "n_categories": args.categories,
        "n_behaviors": 4,
        "n_time_gap_buckets": len(EDGES) + 2,
        "max_history": HISTORY,
        "time_gap_edges": EDGES,
        "behaviors": ["pv", "cart", "fav", "buy"],
    }
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads; {args.candidates} candidates x "
        f"{HISTORY} history (ms), batches of {args.batch_size} (samples/s); {args.repeats} requests"
    )
    print(
        f"{'':8s} {'---------------- latency p50 / p99 (ms) ----------------':>56s} "
        f"{'speedup':>9s} {'----- samples/s at batch -----':>30s}"
    )
    print(
        f"{'model':8s} {'torch':>13s} {'batch graph':>13s} {'request graph':>13s} "
        f"{'Scorer':>13s} {'req/torch':>9s} {'torch':>9s} {'batch graph':>11s} {'speedup':>8s} "
        f"{'max|dp|':>8s}"
    )
    for name in args.models:
        torch.manual_seed(0)
        sizes = {key: spec[key] for key in ("n_items", "n_categories", "n_behaviors")}
        sizes.update(n_time_gap_buckets=spec["n_time_gap_buckets"], max_history=HISTORY)
        model = build_model(name, **sizes, **fixed_size(name))
        model = add_cold_start_rows(model.eval(), model, tables["item_ids"], tables["weights"])
        graph = export_onnx(model)
        session = onnx_session(graph, args.threads)
        request_graph = export_request_onnx(model)
        request_session = onnx_session(request_graph, args.threads)
        items, categories = build_serving_tables(
            tables["item_ids"],
            tables["category_ids"],
            tables["frequency"],
            tables["cold"],
            tables["weights"],
        )
        parity = {"max_abs_diff": float("nan"), "tolerance": 0}
        metadata = describe_serving(
            graph, request_graph, model, model, spec, parity, items, categories
        )
        scorer = Scorer(
            request_graph, metadata, items, categories, threads=args.threads, cache_size=0
        )

        # one user's request: a full history shared by every candidate
        user = random_batch(2, HISTORY, **model.config, seed=1)
        user["time_gap"] = user["time_gap"].sort(dim=1, descending=True).values  # oldest first
        request = random_batch(args.candidates, HISTORY, **model.config, seed=2)
        for key in ("hist_item", "time_gap", "hist_behavior", "mask"):
            request[key] = user[key][:1].expand(args.candidates, -1).contiguous()
        for key, item in (("target_category", "target_item"), ("hist_category", "hist_item")):
            request[key] = tables["item_category"][request[item]]  # the items' own categories
        raw = _raw_request(tables, request)
        throughput = random_batch(args.batch_size, HISTORY, **model.config, seed=3)
        throughput["mask"][:] = True  # every sample with a full history
        for key in ("hist_item", "hist_category", "time_gap", "hist_behavior"):
            throughput[key] = throughput[key].clamp_min(1)

        request_feed = onnx_feed(session, request)
        one_history = {k: v[:1] if v.dim() == 2 else v for k, v in request.items()}
        user_feed = onnx_feed(request_session, one_history)
        batch_feed = onnx_feed(session, throughput)
        with torch.inference_mode():
            expected = torch.sigmoid(model(request)).numpy()
            latency = _alternate(
                [
                    partial(model, request),
                    partial(session.run, None, request_feed),
                    partial(request_session.run, None, user_feed),
                    partial(scorer.score, **raw),
                ],
                args.repeats,
            )
            torch_batch, onnx_batch = _alternate(
                [partial(model, throughput), partial(session.run, None, batch_feed)],
                max(args.repeats // 3, 10),
            )
        difference = np.abs(scorer.score(**raw) - expected).max()
        rate_torch = args.batch_size / np.median(torch_batch) * 1e3
        rate_onnx = args.batch_size / np.median(onnx_batch) * 1e3
        p50 = [np.percentile(times, 50) for times in latency]
        cells = " ".join(
            f"{np.percentile(times, 50):6.2f}/{np.percentile(times, 99):6.2f}" for times in latency
        )
        print(
            f"{name:8s} {cells} {p50[0] / p50[2]:8.1f}x {rate_torch:9,.0f} {rate_onnx:11,.0f} "
            f"{rate_onnx / rate_torch:7.1f}x {difference:8.1e}"
        )
    return 0


def _alternate(calls: list, repeats: int) -> list[np.ndarray]:
    """Milliseconds per call of each function, calling them in turn `repeats` times."""
    for call in calls:  # warm-up
        for _ in range(3):
            call()
    times = np.zeros((len(calls), repeats))
    for repeat in range(repeats):
        for index, call in enumerate(calls):
            started = time.perf_counter()
            call()
            times[index, repeat] = (time.perf_counter() - started) * 1e3
    return list(times)


def _id_tables(n_items: int, n_categories: int) -> dict:
    """Feature-engineering-shaped id tables: raw ids, categories, frequencies, cold items."""
    rng = np.random.default_rng(0)
    item = np.arange(1, n_items + 1)
    category = (item % n_categories) + 1
    count = rng.poisson(8, n_items)
    warm = count >= 5
    total = pd.Series(count * warm).groupby(category).transform("sum").to_numpy()
    return {
        "item_category": torch.as_tensor(np.concatenate([[0], category])),
        "item_ids": pd.DataFrame({"raw_id": item * 7 + 100, "item": item, "category": category}),
        "category_ids": pd.DataFrame(
            {
                "raw_id": np.arange(1, n_categories + 1) * 3,
                "category": np.arange(1, n_categories + 1),
            }
        ),
        "frequency": pd.DataFrame({"item": item, "category": category, "train_count": count}),
        "cold": pd.DataFrame(
            {"item": item[~warm], "category": category[~warm], "train_count": count[~warm]}
        ),
        "weights": pd.DataFrame(
            {"category": category[warm], "item": item[warm], "weight": (count / total)[warm]}
        ),
    }


def _raw_request(tables: dict, batch: dict) -> dict:
    """The Scorer arguments (raw ids, timestamps) of a one-user batch."""
    raw_item = tables["item_ids"]["raw_id"].to_numpy()
    raw_category = tables["category_ids"]["raw_id"].to_numpy()
    now = 1_700_000_000
    gaps = np.asarray([0, *EDGES])[batch["time_gap"][0].numpy() - 1]  # a gap in each bucket
    return {
        "history_items": raw_item[batch["hist_item"][0].numpy() - 1],
        "history_categories": raw_category[batch["hist_category"][0].numpy() - 1],
        "history_timestamps": now - gaps,
        "now": now,
        "candidate_items": raw_item[batch["target_item"].numpy() - 1],
    }


if __name__ == "__main__":
    # what it printed also goes to benchmarks/results/, under the command and machine
    with recorded(RESULTS / "serving.md"):
        status = main()
    sys.exit(status)
