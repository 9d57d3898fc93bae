"""Encoded ids back to raw ids, for reports and for requests in raw ids."""

from __future__ import annotations

import numpy as np
import pandas as pd


def decoder(
    ids: pd.DataFrame, code_column: str, raw_column: str = "raw_id", *, keep_dtype: bool = False
) -> np.ndarray:
    """Array mapping an encoded id (its index) to its raw id.

    Index 0 (padding) maps to None; with `keep_dtype` the array keeps the raw ids' dtype, as a
    caller passes them to `Scorer`, and index 0 repeats the first raw id (it is never looked
    up).
    """
    codes = ids[code_column].to_numpy(np.int64)
    raw = ids[raw_column].to_numpy()
    size = int(codes.max(initial=0)) + 1
    if keep_dtype:
        decoded = np.empty(size, dtype=raw.dtype)
        decoded[0] = raw[0] if len(raw) else decoded[0]
    else:
        decoded = np.full(size, None, dtype=object)
    decoded[codes] = raw
    return decoded


def plain(value: object) -> object:
    """A numpy scalar as the Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value
