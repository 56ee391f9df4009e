"""Turning a `put` batch into an Arrow table of its schema, and the rounding of the token statistics: the store's
side of the hand-off, run on the writer thread (the plugin's side hands over numpy columns only, never Arrow).

Callers hand numpy columns of any numeric dtype; the schema decides the Arrow type (a safe cast, so a value out of
the type's range is an error, not a wrap-around). Besides plain 1-D arrays: a (N, k) array fills a list column
(N lists of k, no Python object per row), and a mapping {key: (N,) array} fills a map column (each row maps every
key to its value); None is a null column.

Statistics precision: the float32 token statistics (schema.ROUNDED_STATS) are rounded to `stat_mantissa_bits`
mantissa bits (round half to even). The default, 10 bits, bounds the relative error by 2**-11 (4.9e-4): at least 3
significant decimal digits. The low bits become zeros, which BYTE_STREAM_SPLIT + zstd store almost for free; this is
what brings a token row to ~12 bytes. `stat_mantissa_bits=None` (or 23) keeps exact float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .schema import ROUNDED_STATS, TABLES

DEFAULT_STAT_MANTISSA_BITS = 10


def check_mantissa_bits(bits: int | None) -> None:
    """Raise ValueError unless `bits` is a valid `stat_mantissa_bits` (1..23, or None for exact float32)."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 23):
        raise ValueError(f"stat_mantissa_bits={bits!r}: pass an integer in 1..23, or None for exact float32")


def stat_relative_tolerance(mantissa_bits: int | None = DEFAULT_STAT_MANTISSA_BITS) -> float:
    """Largest relative error the rounding of `mantissa_bits` introduces (0 when not rounding)."""
    if mantissa_bits is None or mantissa_bits >= 23:
        return 0.0
    return 2.0 ** -(mantissa_bits + 1)


def round_mantissa(values: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Round float32 values to `mantissa_bits` explicit mantissa bits, half to even; inf and nan pass unchanged."""
    drop = 23 - mantissa_bits
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    odd = (bits >> np.uint32(drop)) & np.uint32(1)
    rounded = (bits + half + odd) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    # A carry into the exponent is the correct rounding (e.g. 1.99999 -> 2.0); only the largest finite values
    # could round to inf, and those are kept as they are.
    overflow = (rounded & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return np.where(finite & ~overflow, rounded, bits).view(np.float32)


def to_arrow(table: str, columns: Mapping[str, Any], n: int, *, run_id: str, mantissa_bits: int | None) -> pa.Table:
    """One batch of `put` as an Arrow table of the table's schema: run_id added, step broadcast, stats rounded."""
    schema = TABLES[table]
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise ValueError(f"unknown column(s) {sorted(unknown)} for table {table}")
    arrays = []
    for field in schema:
        if field.name == "run_id":
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run_id])))
            continue
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
            continue
        if field.name == "step" and np.isscalar(value):
            value = np.full(n, value, np.int32)
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        if pa.types.is_map(field.type) and isinstance(value, Mapping):
            value = _map_array(value, n, field.type)
        elif pa.types.is_list(field.type) and isinstance(value, np.ndarray) and value.ndim == 2:
            value = _list_array(value, field.type)
        if not isinstance(value, pa.Array):
            if isinstance(value, np.ndarray) and pa.types.is_float32(field.type):
                value = value.astype(np.float32, copy=False)
            if isinstance(value, np.ndarray):  # e.g. one column of a (N, k) block: Arrow wants contiguous memory
                value = np.ascontiguousarray(value)
            if (
                mantissa_bits is not None
                and field.name in ROUNDED_STATS.get(table, ())
                and isinstance(value, np.ndarray)
            ):
                value = round_mantissa(value, mantissa_bits)
            value = pa.array(value, type=field.type)
        elif field.name in ROUNDED_STATS.get(table, ()) and mantissa_bits is not None:
            mask = value.is_null()
            rounded = round_mantissa(value.cast(pa.float32()).to_numpy(zero_copy_only=False), mantissa_bits)
            value = pa.array(rounded, type=pa.float32(), mask=mask.to_numpy(zero_copy_only=False))
        if value.type != field.type:
            value = value.cast(field.type)
        if len(value) != n:
            raise ValueError(f"column {field.name} has {len(value)} rows, expected {n}")
        arrays.append(value)
    return pa.Table.from_arrays(arrays, schema=schema)


def _list_array(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """(N, k) -> N lists of k."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_.value_type))


def _map_array(values: Mapping[str, np.ndarray], n: int, type_: pa.DataType) -> pa.MapArray:
    """{key: (N,) values} -> N maps of every key, built from flat arrays (no dict per row)."""
    keys = list(values)
    f = len(keys)
    flat = np.stack([np.asarray(values[k]) for k in keys], axis=1).reshape(-1) if f else np.zeros(0)
    offsets = pa.array(np.arange(0, (n + 1) * f, f, dtype=np.int32))
    return pa.MapArray.from_arrays(offsets, pa.array(keys * n, type_.key_type),
                                   pa.array(flat, type=type_.item_type), type=type_)


def n_rows(columns: Mapping[str, Any]) -> int:
    for name, value in columns.items():
        if isinstance(value, Mapping):  # a map column: its length is the number of keys, not rows
            continue
        if name != "step" or not np.isscalar(value):
            try:
                return len(value)
            except TypeError:
                continue
    return 0
