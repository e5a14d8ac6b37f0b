"""``kvbench`` command line: generate, logits, tokenize, info, plan, perplexity, report, compare (and run).

Every subcommand builds the engine through ``engine.loader`` (the same factory the sweeps
use). Errors of the kvbench family print as one line and exit non-zero; a traceback means a
bug in kvbench, not bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.alloc import ALLOCATORS
from engine.atomic import atomic_open
from engine.batch import Batch
from engine.errors import ConfigError, KvbenchError, MemoryFullError
from engine.gguf.keymap import n_params
from engine.gguf.presets import MODEL_NAMES
from engine.gguf.reader import open_gguf
from engine.loader import (
    DTYPES,
    create_engine,
    create_memory,
    load_model,
    resolve_model_path,
)
from engine.memory.codecs import CACHE_TYPES, bytes_per_value
from engine.memory.kv_cache import GROWTH, CacheSpec
from engine.memory.plan import check, plan
from engine.memory.tiers import TIER_NAMES
from engine.model.weights import COMPUTE_MODES
from engine.runtime.sampling import SamplingParams
from engine.runtime.scheduler import Request, Scheduler
from engine.tokenizer import GGUFTokenizer
from harness.config import cache_spec
from harness.corpus import load_text
from harness.env import quiet_env
from harness.perplexity import evaluate
from harness.trackers import LatencyTracker, MemoryTracker

DEFAULT_MODEL = "llama-tiny"


def _parse_tokens(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--tokens {s!r}: expected comma-separated integers, e.g. --tokens 1,2,3") from None
    if not ids:
        raise ConfigError("--tokens: no token ids given")
    return ids


def _add_model_args(p: argparse.ArgumentParser, memory: bool = True, compute: str = "fast") -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"GGUF path or preset ({', '.join(MODEL_NAMES)}); default {DEFAULT_MODEL}")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compute", default=compute, choices=list(COMPUTE_MODES),
                   help=f"exact: float32 on dequantized weights (the parity reference); fast: weights kept in "
                        f"their GGUF format, packed kernels (default {compute})")
    p.add_argument("--dtype", default="f32", choices=list(DTYPES), help="compute=exact: weight/compute dtype")
    p.add_argument("--threads", "-t", type=int, default=None, help="torch CPU threads")
    if memory:
        p.add_argument("--allocator", default="pooled", choices=list(ALLOCATORS), help="KV allocator")
        p.add_argument("--cache-size", "-c", type=int, default=None,
                       help="KV cells (tokens) in total; default: what the run needs, at most n_ctx_train")
        p.add_argument("--block-size", type=int, default=16, help="paged: tokens per block")
        p.add_argument("--type-k", "-ctk", default="f32", choices=list(CACHE_TYPES), help="K cache type")
        p.add_argument("--type-v", "-ctv", default="f32", choices=list(CACHE_TYPES), help="V cache type")
        p.add_argument("--offload", default="device", choices=list(TIER_NAMES), help="where KV lives")
        p.add_argument("--offload-layers", type=int, default=0,
                       help="with --offload host|disk: the first N layers stay on the device")
        p.add_argument("--growth", default="cat", choices=list(GROWTH), help="naive: growth policy")
        p.add_argument("--no-attn-rot", action="store_true",
                       help="store quantized K/V without llama.cpp's Hadamard rotation (LLAMA_ATTN_ROT_DISABLE=1)")
        p.add_argument("--ubatch", "-ub", type=int, default=512, help="tokens per forward pass")
        p.add_argument("--no-memory-check", action="store_true",
                       help="allocate even when the planned memory exceeds what the machine has available")


def _setup(args) -> None:
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads {args.threads}: must be positive")
        torch.set_num_threads(args.threads)


def _cache_spec(args, n_tokens: int, n_seq: int, n_ctx: int) -> CacheSpec:
    size = args.cache_size
    if size is None:  # what the run needs (whole blocks per sequence), capped by the model
        per_seq = -(-n_tokens // args.block_size) * args.block_size
        size = min(-(-n_ctx // args.block_size) * args.block_size, n_seq * per_seq)
    return cache_spec(args.allocator, {"size": size, "block_size": args.block_size, "type_k": args.type_k,
                                       "type_v": args.type_v, "offload": args.offload,
                                       "offload_layers": args.offload_layers, "growth": args.growth,
                                       "attn_rot": not args.no_attn_rot}, n_seq)


def _memory(args, lm, spec: CacheSpec):
    """The KV memory, after checking that what it and a ubatch will take fits in what the machine has."""

    if not args.no_memory_check:
        check(plan(lm.config, spec, args.ubatch), lm.device, spec, override="--no-memory-check")
    return create_memory(lm, spec)


def _prompt_tokens(args, lm) -> list[int]:
    if args.tokens is not None:
        return _parse_tokens(args.tokens)
    return lm.tokenizer.encode(args.prompt)


def cmd_generate(args) -> dict:
    _setup(args)
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
    )
    if args.parallel <= 0:
        raise ConfigError(f"--parallel {args.parallel}: must be positive")
    lm = load_model(args.model, args.device, args.dtype, compute=args.compute)
    prompt = _prompt_tokens(args, lm)
    mem = _memory(args, lm, _cache_spec(args, len(prompt) + args.n_predict, args.parallel, lm.config.n_ctx_train))
    eng = create_engine(lm, mem, args.ubatch)
    if not args.no_warmup:
        eng.warmup()
    eos = None if args.ignore_eos else lm.config.eos_id
    sched = Scheduler(eng, args.parallel, sampling, eos, share_prefix=not args.no_share_prefix)
    for i in range(args.parallel):
        sched.submit(Request(i, prompt, args.n_predict, seed_offset=i))
    # the harness's own trackers observe the run: step times, and memory at its peak
    lat = LatencyTracker(sched)
    memt = MemoryTracker(mem, lm.weight_bytes(), lm.device, keep_peak_stats=True)
    with ExitStack() as stack:
        for t in (lat, memt):
            stack.enter_context(t)
        while (info := sched.step()) is not None:
            for t in (lat, memt):
                t.on_step(info)
    peak = memt.peak_stats or mem.stats()
    peak.preemptions = sched.preemptions
    failed = [r for r in sched.results.values() if r.status == "failed"]
    if failed:
        raise MemoryFullError(f"{len(failed)} of {args.parallel} sequences failed: {failed[0].error}")
    steps = lat.steps
    pre = [x for x in steps if x.n_prefill and not x.n_decode]
    dec = [x for x in steps if x.is_decode]
    pre_s, dec_s = sum(x.seconds for x in pre), sum(x.seconds for x in dec)
    n_pre, n_dec = sum(x.n_prefill for x in pre), sum(x.n_decode for x in dec)
    seqs = [{"id": r.id, "status": r.status, "error": r.error, "tokens": r.tokens, "preemptions": r.preemptions,
             "shared_prefix": r.shared_prefix, "text": lm.tokenizer.continuation(prompt, r.tokens)}
            for r in (sched.results[i] for i in range(args.parallel))]
    breakdown = {"weights": lm.weight_bytes(), **memt.peak_breakdown}  # KV buffers at their peak
    return {
        "model": str(lm.path),
        "allocator": mem.kind,
        "text": seqs[0]["text"],
        "tokens": seqs[0]["tokens"],
        "prompt_tokens": prompt,
        "sequences": seqs,
        "n_prefill_tokens": n_pre,
        "n_decode_tokens": n_dec,
        "prefill_s": pre_s,
        "decode_s": dec_s,
        "prefill_tps": n_pre / pre_s if pre_s else float("nan"),
        "decode_tps": n_dec / dec_s if dec_s else float("nan"),
        "steps": len(steps),
        "memory_breakdown": breakdown,
        "stats": peak.as_dict(),
        "holds": " + ".join(n for n, part in zip(("KV", "state"), mem.parts()) if part is not None),
        "prefix_saved_bytes": (peak.seq_tokens - peak.used_cells) * mem.bytes_per_token,
        "threads": torch.get_num_threads(),
        "device": str(lm.device),
        "compute": lm.compute,
        "kernels": lm.kernels,
        "weight_types": lm.weight_types(),
    }


def cmd_logits(args) -> dict:
    _setup(args)
    tokens = _parse_tokens(args.tokens)
    lm = load_model(args.model, args.device, args.dtype, compute=args.compute)
    mem = _memory(args, lm, _cache_spec(args, len(tokens), 1, max(lm.config.n_ctx_train, len(tokens))))
    eng = create_engine(lm, mem, args.ubatch)
    b = Batch()
    b.add_sequence(tokens, 0, output="all")
    logits = eng.decode(b).cpu().numpy().astype(np.float32)  # (n_tokens, n_vocab)
    out = Path(args.out)
    with atomic_open(out) as f:
        np.save(f, logits)
    return {"out": str(out), "shape": list(logits.shape), "dtype": "float32", "compute": lm.compute}


def cmd_perplexity(args) -> dict:
    _setup(args)
    if args.chunks is not None and args.chunks < 1:
        raise ConfigError(f"--chunks {args.chunks}: must be at least 1")
    text, source = load_text(args.text)
    lm = load_model(args.model, args.device, args.dtype, compute=args.compute)
    tokens = lm.tokenizer.encode(text)
    n = min(len(tokens) // max(args.ctx_size, 1), args.chunks or 1 << 30)
    reference = ("f32", "f32") if args.kl_divergence else None
    with tqdm(total=n, desc="perplexity", unit="chunk", file=sys.stderr, disable=args.json or quiet_env()) as bar:
        res = evaluate(lm, tokens, args.ctx_size, args.chunks, args.type_k, args.type_v, reference, args.ubatch, bar,
                       attn_rot=not args.no_attn_rot)
    return {"model": str(lm.path), "text": source, "n_text_tokens": len(tokens), "compute": lm.compute,
            **res.as_dict()}


def cmd_tokenize(args) -> dict:

    path = resolve_model_path(args.model)
    tok = GGUFTokenizer(open_gguf(path).tokenizer_metadata(), str(path))
    ids = tok.encode(args.text)
    return {"tokens": ids, "pieces": [tok.tokens[i] for i in ids]}


def cmd_info(args) -> dict:

    path = resolve_model_path(args.model)
    f = open_gguf(path)
    cfg = f.config()
    f.check_tensors(cfg)
    tok = GGUFTokenizer(f.tokenizer_metadata(), str(path))  # a damaged vocabulary is part of what info reports
    types = Counter(f.tensor_types().values())
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "gguf_version": f.header.version,
        "architecture": cfg.arch,
        "name": cfg.name,
        "n_params": n_params(cfg),
        "weights_present": cfg.weights_present,
        "tokenizer": {"model": tok.kind, "n_tokens": tok.n_vocab},
        "shapes": {k: getattr(cfg, k) for k in (
            "n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train",
            "n_embd_head_k", "n_embd_head_v", "n_rot", "n_swa")},
        "rope": {"type": cfg.rope_type, "freq_base": cfg.rope_freq_base, "freq_scale": cfg.rope_freq_scale,
                 "freq_factors": "rope_freqs.weight" in f.tensors},
        "tied_output": cfg.tied_output,
        "tensor_types": dict(sorted(types.items())),
        "layer_kinds": list(cfg.layer_kinds),
        "kv_bytes_per_token": {t: cfg.kv_bytes_per_token(bytes_per_value(t), bytes_per_value(t)) for t in CACHE_TYPES},
        "recurrent_bytes_per_seq": cfg.recurrent_bytes_per_seq,
    }


def _print_human(cmd: str, r: dict) -> None:
    if cmd == "generate":
        for seq in r["sequences"]:
            print(seq["text"] if len(r["sequences"]) == 1 else f"[{seq['id']}] {seq['text']}")
        print(
            f"prefill {r['n_prefill_tokens']} tok in {r['prefill_s'] * 1e3:.1f} ms ({r['prefill_tps']:.1f} t/s), "
            f"decode {r['n_decode_tokens']} tok in {r['decode_s'] * 1e3:.1f} ms ({r['decode_tps']:.1f} t/s), "
            f"{r['threads']} threads, {r['device']}, {r['allocator']} {r['holds']} "
            f"peak {r['stats']['live_bytes'] / 2**20:.2f} MiB live of {r['stats']['reserved_bytes'] / 2**20:.2f} MiB",
            file=sys.stderr,
        )
    elif cmd == "tokenize":
        print(",".join(map(str, r["tokens"])))
    elif cmd == "logits":
        print(f"wrote {r['out']}: float32 {r['shape']}")
    elif cmd == "report":
        print(f"wrote {r['report']}, {r['csv']}, {r['html']}")
    elif cmd == "compare":
        print(r["table"])
    elif cmd == "perplexity":
        print(f"PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f} over {r['n_scored']} tokens ({r['n_chunks']} chunks of "
              f"{r['n_ctx']}), K {r['type_k']} / V {r['type_v']}, {r['text']}")
        if r["reference"]:
            k = r["kld"]
            print(f"KL divergence vs {r['reference']}: mean {k['mean']:.6f} +/- {k['stderr']:.6f}, median "
                  f"{k['p50']:.6f}, p99 {k['p99']:.6f}, max {k['max']:.6f}; same top-1 token "
                  f"{100 * r['top1_agreement']:.2f}%")
    elif cmd == "plan":
        _print_plan(r)
    else:
        w = max(len(k) for k in r)
        for k, v in r.items():
            print(f"{k:<{w}}  {v}")


def _print_plan(r: dict) -> None:
    mib, gib = 2**20, 2**30
    print(f"{Path(r['model']).name} ({r['arch']}): {r['memory_bytes'] / gib:.3g} GiB for sequences of {r['context']} "
          f"tokens, K {r['type_k']} / V {r['type_v']}")
    print(f"  weights {r['weights_bytes'] / gib:.3g} GiB ({r['weights']}); runtime "
          f"{r['runtime_floor_bytes'] / mib:.0f} MiB (a fresh kvbench process, measured now), plus one ubatch of "
          f"{r['ubatch']} tokens' buffers (activations below)")
    print(f"  per sequence: KV {r['kv_bytes_per_token'] / 1024:.3g} KiB per token, recurrent state "
          f"{r['state_bytes_per_sequence'] / mib:.3g} MiB")
    for a, f in r["allocators"].items():
        line = (f"  {a:<7} {f['max_sequences']:>6} sequences  ({f['cells_per_sequence']} cells, "
                f"{(f['kv_bytes_per_sequence'] + f['state_bytes_per_sequence']) / mib:.1f} MiB each; cache.size "
                f"{f['cache_size']}; activations {f['activations'] / mib:.0f} MiB; total {f['total'] / gib:.4g} GiB)")
        print(line + "".join(f"\n            {n}" for n in f["notes"]))
    if "max_context" in r:
        from engine.memory.capacity import CONTEXT_LIMIT

        print(f"  longest context for {r['parallel']} sequences: "
              + ", ".join(f"{a} {'any (nothing grows with context)' if c >= CONTEXT_LIMIT else c}"
                          for a, c in r["max_context"].items()))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvbench", description="Benchmark the memory side of LLM inference.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text; prints prefill and decode tokens/s")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument("--tokens", help="prompt token ids, comma-separated")
    g.add_argument("-n", "--n-predict", type=int, default=32, help="tokens to generate")
    g.add_argument("--temperature", "--temp", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--parallel", "-np", type=int, default=1,
                   help="decode P copies of the prompt together (distinct seeds when sampling)")
    g.add_argument("--no-share-prefix", action="store_true", help="prefill every copy instead of seq_cp")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass before timing")
    g.add_argument("--json", action="store_true", help="one JSON object on stdout")

    lg = sub.add_parser("logits", help="write float32 logits [n_tokens, n_vocab] to a .npy file")
    _add_model_args(lg, compute="exact")
    lg.add_argument("--tokens", required=True, help="token ids, comma-separated")
    lg.add_argument("--out", "-o", required=True, help="output .npy path")
    lg.add_argument("--json", action="store_true")

    pp = sub.add_parser("perplexity", help="perplexity (and KL divergence vs f32 KV) on real text, as llama-perplexity")
    pp.add_argument("--model", "-m", default=DEFAULT_MODEL)
    pp.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    pp.add_argument("--compute", default="exact", choices=list(COMPUTE_MODES),
                    help="exact (default: the figures docs/ quote) or fast (packed weights, as llama.cpp computes)")
    pp.add_argument("--dtype", default="f32", choices=list(DTYPES), help="compute=exact: weight/compute dtype")
    pp.add_argument("--threads", "-t", type=int, default=None, help="torch CPU threads")
    pp.add_argument("--text", default=None, help="UTF-8 text file (default: Python's pydoc_data.topics)")
    pp.add_argument("--ctx-size", "-c", type=int, default=512, help="tokens per chunk (llama-perplexity's -c)")
    pp.add_argument("--chunks", type=int, default=None, help="chunks to evaluate (default: all of the text)")
    pp.add_argument("--type-k", "-ctk", default="f32", choices=list(CACHE_TYPES), help="K cache type")
    pp.add_argument("--type-v", "-ctv", default="f32", choices=list(CACHE_TYPES), help="V cache type")
    pp.add_argument("--kl-divergence", action="store_true", help="also compare every position with an f32 KV run")
    pp.add_argument("--no-attn-rot", action="store_true", help="quantized K/V without llama.cpp's Hadamard rotation")
    pp.add_argument("--ubatch", "-ub", type=int, default=512, help="tokens per forward pass")
    pp.add_argument("--json", action="store_true")

    t = sub.add_parser("tokenize", help="token ids of a text, as the model's tokenizer gives them")
    t.add_argument("--model", "-m", default=DEFAULT_MODEL)
    t.add_argument("--text", required=True)
    t.add_argument("--json", action="store_true")

    sub.add_parser("run", help="run a sweep point, or a sweep with -m (Hydra; kvbench run --help)",
                   add_help=False)
    rp = sub.add_parser("report", help="collect a sweep directory into report.csv/.md/.html and plots")
    rp.add_argument("sweep_dir")
    rp.add_argument("--no-plots", action="store_true")
    rp.add_argument("--json", action="store_true")

    cp = sub.add_parser("compare", help="exit 1 when CURRENT regressed against BASELINE (benchmark JSON or sweep dirs), "
                                        "3 when timings got worse only under contention (inconclusive)")
    cp.add_argument("baseline")
    cp.add_argument("current")
    cp.add_argument("--rules", help="YAML rules: match, kind (relative|exact), direction, tolerance, gate, timing")
    cp.add_argument("--all", action="store_true", help="show unchanged metrics too")
    cp.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="how many sequences of a context fit in a memory budget, per allocator")
    pl.add_argument("--model", "-m", default=DEFAULT_MODEL, help="GGUF path or preset (metadata only: shape-only "
                                                                    "files such as llama-7b work)")
    pl.add_argument("--memory", required=True, help="the whole budget: weights, KV / state and runtime (24GiB, "
                                                     "24GB, 512MiB or bytes)")
    pl.add_argument("--context", type=int, required=True, help="tokens per sequence (prompt and output)")
    pl.add_argument("--parallel", "-np", type=int, default=None,
                    help="also: the longest context this many sequences can have")
    pl.add_argument("--type-k", "-ctk", default="f16", choices=list(CACHE_TYPES), help="K cache type (default f16)")
    pl.add_argument("--type-v", "-ctv", default="f16", choices=list(CACHE_TYPES), help="V cache type (default f16)")
    pl.add_argument("--block-size", type=int, default=16, help="paged: tokens per block")
    pl.add_argument("--growth", default="cat", choices=list(GROWTH), help="naive: how per-sequence tensors grow")
    pl.add_argument("--ubatch", type=int, default=512, help="tokens per ubatch (its transient buffers)")
    pl.add_argument("--compute", default="fast", choices=list(COMPUTE_MODES), help="how the weights are held")
    pl.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="compute=exact weights (default f32), or a shape-only file's parameters (default f16)")
    pl.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="architecture, shapes, tensor types, KV bytes per token")
    i.add_argument("--model", "-m", default=DEFAULT_MODEL)
    i.add_argument("--json", action="store_true")
    return ap


def cmd_report(args) -> dict:
    # imported when used: pandas and matplotlib cost start-up time that generate / tokenize / info do not need
    from harness.report import write_report

    d = Path(args.sweep_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: not a directory; pass a sweep directory (results/multirun/...)")
    # write_report raises ConfigError (exit 2) when the directory holds no readable record
    out = write_report(d, plots=not args.no_plots)
    return {"report": str(out), "csv": str(d / "report.csv"), "html": str(d / "report.html")}


def cmd_compare(args) -> dict:
    from harness.compare import (
        check_coverage,
        compare,
        load_metrics,
        load_rules,
        render,
    )

    base, cur = load_metrics(Path(args.baseline)), load_metrics(Path(args.current))
    rows = compare(base, cur, load_rules(Path(args.rules) if args.rules else None))
    check_coverage(rows, args.baseline, args.current)
    regressed = [r.metric for r in rows if r.status == "regressed"]
    table = render(rows, args.all)
    base_noise = dict.fromkeys(v.noisy for v in base.values() if v.noisy)
    if base_noise:  # inflated baseline times can hide a regression: say so, the verdict stands
        table += (f"\nWARNING: the baseline was measured under contention ({'; '.join(base_noise)}); "
                  "its times are inflated and can hide a regression. Regenerate it on a quiet machine.")
    return {"table": table, "regressed": regressed,
            "inconclusive": [r.metric for r in rows if r.status == "noisy"],
            "rows": [{"metric": r.metric, "baseline": r.base, "current": r.cur,
                      "change": r.change, "status": r.status} for r in rows]}


_FLOOR = """
import sys, psutil, torch, harness.point
from engine.gguf.reader import open_gguf
from engine.tokenizer import GGUFTokenizer
f = open_gguf(sys.argv[1]); c = f.config(); GGUFTokenizer(f.tokenizer_metadata(), sys.argv[1])
torch.randn(512, c.n_embd) @ torch.randn(c.n_embd, max(c.n_ff, c.n_embd))  # the GEMM library's buffers and threads
print(psutil.Process().memory_info().rss)
"""


def runtime_floor(path: Path, cfg) -> int:
    """What a kvbench run's process holds besides the weights and the sequences' memory, measured here and now:
    a fresh Python that has imported what a sweep point imports, read the file's header and tokenizer and run
    one GEMM of the model's width (the BLAS library's buffers and thread pools), its RSS."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _FLOOR, str(path)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not r.stdout.strip().isdigit():
        raise ConfigError(f"{path}: could not measure the runtime's memory ({r.stderr.strip().splitlines()[-1:]})")
    return int(r.stdout.strip())


def cmd_plan(args) -> dict:
    """How many sequences of --context fit in --memory, per allocator, and the longest context for --parallel
    sequences: engine/memory/capacity.py from the file's metadata alone."""

    from engine.memory.capacity import (
        ALLOCATOR_ORDER,
        Budget,
        fit,
        max_context,
        parse_bytes,
    )

    try:
        memory = parse_bytes(args.memory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("context", "parallel", "ubatch", "block_size"):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {v}: must be at least 1")
    path = resolve_model_path(args.model)
    f = open_gguf(path)
    cfg = f.config()
    f.check_tensors(cfg)
    dtype = DTYPES[args.dtype or ("f32" if cfg.weights_present else "f16")]
    if cfg.weights_present:
        weights = f.planned_weight_bytes(cfg, args.compute, dtype)
        how = f"{args.compute} mode, as loaded"
    else:  # a shape-only file: parameters in the dtype (what memory-only runs count)
        weights = n_params(cfg) * torch.empty((), dtype=dtype).element_size()
        how = f"shape only: {n_params(cfg):,} parameters in {args.dtype or 'f16'}"
    floor = runtime_floor(path, cfg)
    budget = Budget(memory, weights, floor)
    spec = CacheSpec(type_k=args.type_k, type_v=args.type_v, block_size=args.block_size, growth=args.growth)
    compute_bytes = 4
    fits = {a: fit(cfg, a, args.context, budget, spec, args.ubatch, compute_bytes) for a in ALLOCATOR_ORDER}
    out = {
        "model": str(path), "arch": cfg.arch, "memory_bytes": memory, "context": args.context,
        "type_k": args.type_k, "type_v": args.type_v, "ubatch": args.ubatch,
        "weights_bytes": weights, "weights": how, "runtime_floor_bytes": floor,
        "kv_bytes_per_token": fits["pooled"].kv_bytes_per_sequence // max(fits["pooled"].cells_per_sequence, 1),
        "state_bytes_per_sequence": cfg.recurrent_bytes_per_seq,
        "max_sequences": {a: fits[a].max_sequences for a in ALLOCATOR_ORDER},
        "allocators": {a: vars(fits[a]) for a in ALLOCATOR_ORDER},
    }
    if args.parallel:
        out["parallel"] = args.parallel
        out["max_context"] = {a: max_context(cfg, a, args.parallel, budget, spec, args.ubatch, compute_bytes)
                              for a in ALLOCATOR_ORDER}
    return out


COMMANDS = {"generate": cmd_generate, "logits": cmd_logits, "tokenize": cmd_tokenize, "info": cmd_info,
            "perplexity": cmd_perplexity, "report": cmd_report, "compare": cmd_compare, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":  # Hydra owns run's command line (overrides, -m, --cfg ...)
        # imported when used: Hydra costs start-up time the other commands do not need
        from harness.sweep import main as run_main

        try:
            return run_main(argv[1:])
        except KvbenchError as e:
            print(f"kvbench run: error: {e}", file=sys.stderr)
            return e.exit_code
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.cmd](args)
    except KvbenchError as e:
        print(f"kvbench {args.cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kvbench: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        _print_human(args.cmd, result)
    if args.cmd == "compare" and result["regressed"]:
        return 1  # a regression (bad input exits 2)
    if args.cmd == "compare" and result["inconclusive"]:
        return 3  # timings worse under contention only: rerun on a quiet machine (harness/compare.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
