"""Recurrent state vs KV cache: what a report says when a sweep has Mamba or hybrid models.

A KV cache holds K and V for every token of a sequence, so its bytes grow with context. A Mamba
layer folds the whole history into a fixed state (conv state + SSM state) per sequence: the same
bytes at 10 tokens and at 100k. The table and the plot use the byte counts the runs measured
(``memory.kv_bytes_per_token`` from the KV store, ``memory.recurrent_bytes_per_seq`` from the
recurrent store; tests tie both to the allocators' real tensors), and the runs' peaks show it.
"""

from __future__ import annotations

import pandas as pd

CONTEXTS = (512, 4096, 32768)
MIB = 2**20


def models(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df["status"] == "ok"]
    cols = ["model.name", "memory.kv_bytes_per_token", "memory.recurrent_bytes_per_seq"]
    if ok.empty or not set(cols) <= set(ok.columns):
        return pd.DataFrame(columns=cols)
    return ok[cols].drop_duplicates("model.name").reset_index(drop=True)


def has_recurrent(df: pd.DataFrame) -> bool:
    m = models(df)
    return not m.empty and (pd.to_numeric(m["memory.recurrent_bytes_per_seq"], errors="coerce") > 0).any()


def state_markdown(df: pd.DataFrame) -> str:
    m = models(df)
    rows = []
    for r in m.itertuples(index=False):
        kv, st = float(r[1] or 0), float(r[2] or 0)
        rows.append([r[0], f"{kv / 1024:.3g}", f"{st / 1024:.3g}"]
                    + [f"{(kv * n + st) / MIB:.3g}" for n in CONTEXTS])
    table = pd.DataFrame(rows, columns=["model", "KV KiB / token", "recurrent state KiB / sequence"]
                         + [f"MiB / sequence at {n} tokens" for n in CONTEXTS])
    ok = df[df["status"] == "ok"]
    peaks = ""
    if {"memory.kv_live_peak_bytes", "memory.state_live_peak_bytes"} <= set(ok.columns):
        p = ok[["model.name", "allocator", "memory.kv_live_peak_bytes", "memory.state_live_peak_bytes"]].copy()
        p["memory.kv_live_peak_bytes"] = pd.to_numeric(p["memory.kv_live_peak_bytes"]) / MIB
        p["memory.state_live_peak_bytes"] = pd.to_numeric(p["memory.state_live_peak_bytes"]) / MIB
        p.columns = ["model", "allocator", "KV live at peak (MiB)", "recurrent state live at peak (MiB)"]
        peaks = "\n\nMeasured in this sweep:\n\n" + p.to_markdown(index=False, floatfmt=".3g")
    return ("## Recurrent state vs KV cache\n\n"
            "A KV cache keeps K and V for every token of a sequence, so its memory grows linearly with "
            "context. A Mamba layer folds the whole history into one fixed-size state per sequence (the "
            "conv state holds the last d_conv - 1 inputs, the SSM state d_inner x d_state values): the "
            "same bytes at 10 tokens and at 100k. A hybrid (Jamba) pays per token only for its attention "
            "layers. Per sequence, from the byte counts measured here:\n\n"
            + table.to_markdown(index=False) + peaks + "\n\n![memory vs context](plots/memory_vs_context.png)\n")
