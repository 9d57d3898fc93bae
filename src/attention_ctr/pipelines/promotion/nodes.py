"""Promotion nodes: gate each model's new export against the promoted one, move the pointer."""

from __future__ import annotations

import logging
import math
from functools import partial

from attention_ctr.datasets import PointerUpdate
from attention_ctr.errors import InputError

logger = logging.getLogger(__name__)


def _candidate(serving_metadata: dict, test_metrics: dict) -> dict:
    test = test_metrics["test"]
    return {
        "version": serving_metadata["version"],
        "model_sha256": serving_metadata.get("model_sha256"),
        # the bundle's digests: `Scorer.from_project(..., version="promoted")` checks them
        "metadata_sha256": serving_metadata.get("metadata_sha256"),
        "request_onnx_sha256": serving_metadata["request_onnx_sha256"],
        "onnx_sha256": serving_metadata["onnx_sha256"],
        "items_sha256": serving_metadata.get("items_sha256"),
        "categories_sha256": serving_metadata.get("categories_sha256"),
        "parity_max_abs_diff": serving_metadata.get("parity_max_abs_diff"),
        "parity_tolerance": serving_metadata.get("parity_tolerance"),
        "test_auc": test["auc"],
        "test_gauc": test["gauc"],
        "test_logloss": test["logloss"],
        "test_samples": test["samples"],
    }


def _refusal(candidate: dict, test_metrics: dict) -> str | None:
    """Why the candidate cannot be promoted whatever the incumbent, or None."""
    difference, tolerance = candidate["parity_max_abs_diff"], candidate["parity_tolerance"]
    if candidate["model_sha256"] is None or tolerance is None:
        return "the export predates the promotion gate's records: export this model again"
    if candidate["metadata_sha256"] is None:
        return "the export predates sealed bundles (no metadata_sha256): export this model again"
    if not (difference is not None and difference <= tolerance):
        return (
            f"ONNX parity failed: max abs diff {difference} above the tolerance "
            f"{candidate['parity_tolerance']}"
        )
    if test_metrics.get("model_sha256") != candidate["model_sha256"]:
        return (
            "the test metrics are of another model than the exported one (model_sha256 "
            f"{test_metrics.get('model_sha256')} vs {candidate['model_sha256']}): run evaluation "
            "and export on the same trained model"
        )
    if candidate["test_auc"] is None or not math.isfinite(candidate["test_auc"]):
        return "the test AUC is undefined (the test split holds one class only)"
    return None


def _incumbent(promoted_models: dict, name: str) -> dict | None:
    """The pointer's entry for `name`; a malformed one is an error naming the entry."""
    entry = promoted_models.get(name)
    if entry is None:
        return None
    problem = None
    if not isinstance(entry, dict):
        problem = f"it is a {type(entry).__name__}, not an object"
    elif not isinstance(entry.get("version"), str):
        problem = f"it has no 'version' string (keys: {sorted(entry)})"
    elif not isinstance(entry.get("test_auc"), int | float):
        problem = f"it has no numeric 'test_auc' (keys: {sorted(entry)})"
    if problem:
        raise InputError(
            f"Promotion pointer promoted_models (data/06_models/promoted_models.json) has a "
            f"malformed entry {name!r}: {problem}; restore it or delete the entry to promote "
            f"{name}'s next export unconditionally"
        )
    return entry


def decide_promotion(
    serving_metadata: dict, test_metrics: dict, promoted_models: dict, params: dict
) -> dict:
    """Whether this run's export of one model replaces the promoted version of that model.

    Promoted when its ONNX parity passed and its test AUC is at most `params["tolerance"]`
    below the promoted version's (or nothing of this model is promoted yet).
    """
    name = serving_metadata["model"]
    tolerance = float(params["tolerance"])
    if not tolerance >= 0:
        raise ValueError(f"promotion.tolerance must be >= 0, got {params['tolerance']!r}")
    candidate = _candidate(serving_metadata, test_metrics)
    incumbent = _incumbent(promoted_models, name)
    refusal = _refusal(candidate, test_metrics)
    if refusal is not None:
        promoted, reason = False, refusal
    elif incumbent is None:
        promoted, reason = True, "nothing of this model was promoted before"
    elif incumbent["version"] == candidate["version"]:
        promoted, reason = True, "this version is already the promoted one"
    else:
        floor = incumbent["test_auc"] - tolerance
        promoted = candidate["test_auc"] >= floor
        comparison = ">=" if promoted else "<"
        reason = (
            f"test AUC {candidate['test_auc']:.4f} {comparison} the promoted version's "
            f"{incumbent['test_auc']:.4f} - tolerance {tolerance:g}"
        )
    logger.info(
        "%s %s: %s %s", name, candidate["version"], "promoted" if promoted else "kept out", reason
    )
    return {
        "model": name,
        "promoted": promoted,
        "reason": reason,
        "tolerance": tolerance,
        "candidate": candidate,
        "incumbent": incumbent,
    }


def _apply(promoted_models: dict, decisions: list[dict]) -> dict:
    """The pointer after `decisions`, applied to `promoted_models` as it is now.

    A promoted candidate whose model entry is no longer the incumbent its gate saw (another
    run moved it meanwhile) is gated again against the current entry, with the same tolerance.
    """
    pointer = dict(promoted_models)
    for decision in decisions:
        if not decision["promoted"]:
            continue
        name, entry = decision["model"], {**decision["candidate"]}
        incumbent = _incumbent(pointer, name)
        moved = incumbent != decision["incumbent"] and incumbent is not None
        if moved and incumbent["version"] != entry["version"]:
            floor = incumbent["test_auc"] - decision["tolerance"]
            if not entry["test_auc"] >= floor:
                logger.warning(
                    "%s %s kept out after all: another run promoted %s (test AUC %.4f) meanwhile",
                    name,
                    entry["version"],
                    incumbent["version"],
                    incumbent["test_auc"],
                )
                continue
        if incumbent is not None and incumbent["version"] != entry["version"]:
            entry["replaced_version"] = incumbent["version"]
        pointer[name] = entry
    return pointer


def move_promotion_pointer(promoted_models: dict, **decisions: dict) -> dict:
    """The new pointer (each model's serving version) after this run's decisions.

    A model whose candidate was refused keeps its promoted version; a model this run did not
    gate keeps its entry untouched. The pointer is a `PointerUpdate`: saved, it is decided
    again under the file's lock if another run moved the pointer since this run read it.
    """
    gated = list(decisions.values())
    return PointerUpdate(
        _apply(promoted_models, gated),
        base=promoted_models,
        rebase=partial(_apply, decisions=gated),
    )


def report_promotion(promoted_models: dict, **decisions: dict) -> dict:
    """This run's report, from the pointer as it was written (`promoted_models`, read back
    after the save): a candidate its gate passed but that another run's promotion kept out
    under the lock is reported kept out, never promoted."""
    gated = list(decisions.values())

    def serving(decision: dict) -> bool:
        entry = promoted_models.get(decision["model"]) or {}
        return decision["promoted"] and entry.get("version") == decision["candidate"]["version"]

    return {
        "promoted": sorted(d["model"] for d in gated if serving(d)),
        "kept_out": sorted(d["model"] for d in gated if not serving(d)),
        "kept_out_by_another_run": sorted(
            d["model"] for d in gated if d["promoted"] and not serving(d)
        ),
        "serving": {name: entry["version"] for name, entry in sorted(promoted_models.items())},
        "decisions": {d["model"]: d for d in gated},
    }
