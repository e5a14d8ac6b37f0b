"""Recurrent state vs KV cache: what a report says when a sweep has recurrent or hybrid models.

Five kinds of sequence memory, each with its own law against context length n:
- a KV cache holds K and V for every token: bytes grow as n;
- a sliding-window KV cache (SWA layers) needs only the last window of tokens: it stops growing at the window
  (what an allocator actually holds is measured: llama.cpp's pool keeps masked cells until it reuses them);
- a recurrent layer (Mamba-1, Mamba-2, RWKV-7) folds the whole history into a fixed state per sequence: the same
  bytes at 10 tokens and at 100k;
- a hybrid (Jamba, Granite 4) pays per token only for its attention layers, plus a fixed state.

The projection uses the byte counts the runs measured (``memory.kv_bytes_per_token`` from the KV store,
``memory.recurrent_bytes_per_seq`` from the recurrent store, ``memory.kv_window_tokens`` and
``memory.kv_swa_share`` from the model; tests tie the first two to the allocators' real tensors). The measured
table and the plot's markers are the trackers' peaks of live KV and state bytes, divided by the sequences the
run held at once.
"""

from __future__ import annotations

import pandas as pd

CONTEXTS = (512, 4096, 32768)
MIB = 2**20
_COLS = ["model.name", "memory.kv_bytes_per_token", "memory.recurrent_bytes_per_seq", "memory.state_kind",
         "memory.kv_window_tokens", "memory.kv_swa_share"]
_STATE = {"mamba1": "Mamba-1", "mamba2": "Mamba-2", "rwkv7": "RWKV-7"}


def models(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df["status"] == "ok"]
    if ok.empty or not set(_COLS[:3]) <= set(ok.columns):
        return pd.DataFrame(columns=_COLS)
    m = ok.reindex(columns=_COLS).drop_duplicates("model.name").reset_index(drop=True)
    for c in _COLS[1:]:
        if c != "memory.state_kind":
            m[c] = pd.to_numeric(m[c], errors="coerce").fillna(0)
    m["memory.state_kind"] = m["memory.state_kind"].fillna("").astype(str).replace("nan", "")
    return m


def has_recurrent(df: pd.DataFrame) -> bool:
    m = models(df)
    return not m.empty and (m["memory.recurrent_bytes_per_seq"] > 0).any()


def kind(r) -> str:
    """The model's memory in words: 'KV', 'SWA KV (window 64)', 'Mamba-2 state + KV', 'RWKV-7 state'..."""
    kv = "KV" if r["memory.kv_bytes_per_token"] > 0 else ""
    if kv and r["memory.kv_window_tokens"] > 0:
        share = r["memory.kv_swa_share"]
        kv = f"SWA KV (window {int(r['memory.kv_window_tokens'])}" + (")" if share >= 1 else f", {share:.0%} of layers)")
    state = f"{_STATE.get(r['memory.state_kind'], r['memory.state_kind'])} state" if r["memory.state_kind"] else ""
    return " + ".join(p for p in (state, kv) if p)


def projected(r, n: int) -> float:
    """Bytes per sequence at context n: full-attention layers grow with n, windowed ones up to the window,
    the recurrent state is constant."""
    kv, share, win = r["memory.kv_bytes_per_token"], r["memory.kv_swa_share"], r["memory.kv_window_tokens"]
    windowed = kv * share * min(n, win) if win else 0.0
    return kv * (1 - share if win else 1) * n + windowed + r["memory.recurrent_bytes_per_seq"]


def measured(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, allocator and context (the tokens a sequence of a fixed workload has fed: its prompt and all
    but the last generated token): the peak of live KV and state bytes over the sequences held at once. Empty
    unless the sweep used fixed-length requests."""
    ok = df[df["status"] == "ok"]
    need = {"workload.prompt_len", "workload.output_len", "memory.kv_live_peak_bytes", "memory.state_live_peak_bytes",
            "parallel", "requests.total"}
    if ok.empty or not need <= set(ok.columns):
        return pd.DataFrame(columns=["model", "allocator", "context", "MiB per sequence"])
    ok = ok.dropna(subset=["workload.prompt_len", "workload.output_len"])
    num = lambda c: pd.to_numeric(ok[c], errors="coerce")  # noqa: E731
    seqs = pd.concat([num("parallel"), num("requests.total")], axis=1).min(axis=1)
    out = pd.DataFrame({"model": ok["model.name"], "allocator": ok["allocator"],
                        "context": (num("workload.prompt_len") + num("workload.output_len") - 1).astype(int),
                        "MiB per sequence": (num("memory.kv_live_peak_bytes").fillna(0)
                                             + num("memory.state_live_peak_bytes").fillna(0)) / seqs / MIB})
    return out.groupby(["model", "allocator", "context"], as_index=False, sort=False)["MiB per sequence"].median()


def state_markdown(df: pd.DataFrame) -> str:
    m = models(df)
    rows = [[r["model.name"], kind(r), f"{r['memory.kv_bytes_per_token'] / 1024:.3g}",
             f"{r['memory.recurrent_bytes_per_seq'] / 1024:.3g}"] + [f"{projected(r, n) / MIB:.3g}" for n in CONTEXTS]
            for _, r in m.iterrows()]
    table = pd.DataFrame(rows, columns=["model", "memory", "KV KiB / token", "state KiB / sequence"]
                         + [f"MiB / sequence at {n} tokens" for n in CONTEXTS])
    meas = measured(df)
    text = ""
    if not meas.empty:
        by = {r["model.name"]: r for _, r in m.iterrows()}
        meas["cell"] = [f"{v:.3g} ({projected(by[mo], c) / MIB:.3g})" if mo in by else f"{v:.3g}"
                        for mo, c, v in zip(meas["model"], meas["context"], meas["MiB per sequence"])]
        piv = meas.pivot_table(index=["model", "allocator"], columns="context", values="cell", aggfunc="first",
                               sort=False)
        piv.columns = [f"{c} tokens" for c in piv.columns]
        text = ("\n\nMeasured in this sweep: live KV + state bytes at the run's peak, per sequence held, in MiB "
                "(the projection in brackets) at the context each sequence reached. Where an allocator holds more "
                "than the projection it keeps bytes the model does not read: masked sliding-window cells (llama.cpp's "
                "pool reuses them lazily), growth slack, and for a window also the ubatch being written:\n\n"
                + piv.reset_index().to_markdown(index=False))
    return ("## Recurrent state vs KV cache\n\n"
            "A KV cache keeps K and V for every token of a sequence, so its memory grows linearly with context; "
            "a sliding-window cache needs only the last window. A recurrent layer (Mamba-1, Mamba-2, RWKV-7) folds "
            "the whole history into one fixed-size state per sequence: the same bytes at 10 tokens and at 100k. A "
            "hybrid (Jamba, Granite 4) pays per token only for its attention layers. Per sequence, projected from "
            "the byte counts measured here:\n\n"
            + table.to_markdown(index=False) + text + "\n\n![memory vs context](plots/memory_vs_context.png)\n")
