"""Tiny model sizes shared by the model tests (fast, but every code path exercised)."""

SIZES = {
    "n_items": 40,
    "n_categories": 5,
    "n_behaviors": 4,
    "n_time_gap_buckets": 7,
    "max_history": 6,
    "embedding_dim": 8,
    "mlp_hidden": [16, 8],
}
