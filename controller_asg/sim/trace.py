"""Load a request-rate trace: one rate per line (per second or per `step` seconds), `.gz` accepted,
or a CSV with a `timestamp,rate` header and any further columns (e.g. `backlog`, an external
metric). `load_trace` returns requests/s for every second; `load_columns` every column so."""

from __future__ import annotations

import gzip
import io

import numpy as np


class TraceError(ValueError):
    pass


def load_trace(path: str, step: float = 1.0) -> np.ndarray:
    return load_columns(path, step)["rate"]


def load_columns(path: str, step: float = 1.0) -> dict[str, np.ndarray]:
    """Every column per second: `rate` always, and by its header name each other column of a CSV."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise TraceError(f"--trace={path}: expected a readable text file of request rates ({exc})") from None
    if not text.strip():
        raise TraceError(f"--trace={path}: expected one number per line, got an empty file")
    first = text.split("\n", 1)[0].strip().lower()
    try:
        if first.replace(" ", "").startswith("timestamp,"):
            cols = [c.strip() for c in first.split(",")]
            if "rate" not in cols:
                raise TraceError(f"--trace={path}: expected a CSV header 'timestamp,rate'")
            data = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
            if data.shape[1] != len(cols):
                raise TraceError(f"--trace={path}: expected {len(cols)} values per line, as the header names")
            ts = data[:, cols.index("timestamp")]
            columns = {name: data[:, i] for i, name in enumerate(cols) if name != "timestamp"}
            if len(ts) > 1:
                step = float(np.median(np.diff(ts)))
        else:
            columns = {"rate": np.loadtxt(io.StringIO(text), ndmin=1, dtype=float)}
    except ValueError as exc:
        raise TraceError(f"--trace={path}: expected one number per line ({exc})") from None
    for name, values in columns.items():
        if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise TraceError(f"--trace={path}: expected non-negative finite values in column {name!r}, at least one")
    return {name: expand(values, step) for name, values in columns.items()}


def expand(rates: np.ndarray, step: float) -> np.ndarray:
    """Rates per `step` seconds to rates per second (each value held for its step)."""
    if step <= 0:
        raise TraceError(f"--step={step}: expected a positive number of seconds")
    if step == 1:
        return rates.astype(float)
    seconds = int(round(len(rates) * step))
    idx = (np.arange(seconds) / step).astype(int)
    return rates[np.minimum(idx, len(rates) - 1)].astype(float)


def smooth(demand: np.ndarray, seconds: int) -> np.ndarray:
    """Trailing-free centred moving average over `seconds` (0 or 1: unchanged)."""
    if seconds <= 1:
        return demand
    kernel = np.ones(seconds) / seconds
    pad = seconds // 2
    padded = np.concatenate([np.full(pad, demand[0]), demand, np.full(seconds - 1 - pad, demand[-1])])
    return np.convolve(padded, kernel, mode="valid")
