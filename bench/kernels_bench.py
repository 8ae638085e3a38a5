#!/usr/bin/env python3
"""Benchmark of the vllm-kvcomp Triton kernels against naive torch, on one GPU.

Measures the device-to-device copy bandwidth (bytes read + written), then times
score_gather (FlashAttention LSE given, and the two-pass variant), in-place
compaction and page copies at the benchmark shape (default: 32 requests x
16384 tokens, Hkv=8, Hq=32, head_dim 128, window 32, block 16, bf16, 7-wide
max pooling; budget 0.2 with 4 sinks and 64 recent). Each kernel is checked
once against its torch version before timing. Medians from
triton.testing.do_bench. Writes <out>/kernels.json and prints a markdown table
last. Imports only torch, triton and this package's kernels (not vllm).

score_gather's kernels run with the launch configuration autotune picks
(kernels/score_gather_configs.py): by default the one tuned on the H100; with
--tune, VLLM_KVCOMP_AUTOTUNE=1 makes autotune time every candidate on the first
call at the benchmark shape, and the bench prints each candidate's time (and
sweeps compact_kv_'s block_k, which is not autotuned). The configs used are
printed and recorded in kernels.json ("launch_configs").

    python bench/kernels_bench.py [--out bench/results] [--requests 32] [--seq-len 16384] [--tune]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

try:
    from vllm_kvcomp.kernels import compact_kv_, copy_pages_, score_gather, select_keep_indices
    from vllm_kvcomp.kernels import score_gather_kernels as sgk
    from vllm_kvcomp.kernels.common import AUTOTUNE_ENV
except ImportError:  # not installed: import the folder as the package
    import importlib.util
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = types.ModuleType("vllm_kvcomp")
    pkg.__path__ = [os.path.join(root, "vllm_kvcomp")]
    sys.modules.setdefault("vllm_kvcomp", pkg)
    spec = importlib.util.spec_from_file_location(
        "vllm_kvcomp.kernels",
        os.path.join(root, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(root, "kernels")],
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm_kvcomp.kernels"] = mod
    spec.loader.exec_module(mod)
    from vllm_kvcomp.kernels import compact_kv_, copy_pages_, score_gather, select_keep_indices
    from vllm_kvcomp.kernels import score_gather_kernels as sgk
    from vllm_kvcomp.kernels.common import AUTOTUNE_ENV


def _commit() -> str | None:
    """The commit measured ($KVCOMP_COMMIT on the device, whose tree has no reliable .git)."""
    try:
        from bench.offline import current_commit  # with the repository root (or the device's tools) on the path
    except ImportError:
        return os.environ.get("KVCOMP_COMMIT")
    return current_commit()


def median_ms(fn, warmup=25, rep=200):
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


# --------------------------------------------------------------------------- #
# naive torch versions
# --------------------------------------------------------------------------- #
def torch_gather_keys(kv, pt, S):
    """[R, Hkv, S, D] keys of every request (all of length S) through the page table."""
    bs = kv.shape[2]
    t = torch.arange(S, device=kv.device)
    pages = pt[:, t // bs].long()  # [R, S]
    return kv[pages, 0, (t % bs)[None, :].expand_as(pages)].permute(0, 2, 1, 3)  # [R, Hkv, S, D]


def torch_scores(q, kv, pt, S, scale, pool_kernel, compute_dtype=None, return_lse=False):
    """Naive SnapKV scores (all requests of length S, full windows): gather + matmul + softmax + pool."""
    R, W, Hq, D = q.shape
    Hkv = kv.shape[3]
    G = Hq // Hkv
    keys = torch_gather_keys(kv, pt, S)
    qg = q.view(R, W, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(R, Hkv, G * W, D)
    if compute_dtype is not None:
        keys, qg = keys.to(compute_dtype), qg.to(compute_dtype)
    logits = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [R, Hkv, G*W, S]
    i = torch.arange(W, device=q.device).repeat(G)  # row (j, i) -> i
    t = torch.arange(S, device=q.device)
    masked = t[None, :] > (S - W + i)[:, None]
    logits.masked_fill_(masked, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1) if return_lse else None
    probs = torch.softmax(logits, dim=-1).view(R, Hkv, G, W, S)
    a = probs.sum(3)  # [R, Hkv, G, S]
    mass = a.sum(2)
    pooled = F.max_pool1d(a.view(-1, 1, S), pool_kernel, 1, pool_kernel // 2).view(R, Hkv, G, S)
    scores = pooled.sum(2)
    if return_lse:
        lse = lse.view(R, Hkv, G, W).permute(0, 3, 1, 2).reshape(R, W, Hq)
        return scores, mass, lse.contiguous()
    return scores, mass


def torch_compact(kv, pt, keep_idx, keep_counts_list):
    """Index-based gather then scatter (equal keep counts per row in the benchmark)."""
    B, Hkv, _ = keep_idx.shape
    K = keep_counts_list[0]
    bs = kv.shape[2]
    src = keep_idx[:, :, :K].long()
    dst = torch.arange(K, device=kv.device).expand(B, Hkv, K)
    ptl = pt.long()
    sp = torch.gather(ptl[:, None, :].expand(B, Hkv, -1), 2, src // bs)
    dp = torch.gather(ptl[:, None, :].expand(B, Hkv, -1), 2, dst // bs)
    g = torch.arange(Hkv, device=kv.device)[None, :, None].expand(B, Hkv, K)
    vals = kv[sp, :, src % bs, g]  # [B, Hkv, K, 2, D]
    kv[dp, :, dst % bs, g] = vals


def rel(a, b):
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return float("inf")
    return ((a[fin].double() - b[fin].double()).norm() / b[fin].double().norm()).item()


AUTOTUNED = {
    "window_sum": sgk.window_sum_kernel,
    "lse_partial": sgk.lse_partial_kernel,
    "pool": sgk.pool_gqa_kernel,
}


def report_launch_configs(tuned):
    """The config each autotuned score_gather kernel runs with; with --tune, every candidate's time."""
    chosen = {}
    for name, kernel in AUTOTUNED.items():
        if getattr(kernel, "best_config", None) is None:
            continue  # not launched
        chosen[name] = str(kernel.best_config)
        print(f"\n{name}: {kernel.best_config}", flush=True)
        timings = getattr(kernel, "configs_timings", None) or {}
        if tuned and timings:
            print("| config | median ms | p20 ms | p80 ms |")
            print("|---|---|---|---|")
            for cfg, (med, p20, p80) in sorted(timings.items(), key=lambda kv: kv[1][0]):
                print(f"| {cfg} | {med:.3f} | {p20:.3f} | {p80:.3f} |")
    return chosen


def tune_compaction(args, kv, pt, sl, scores):
    """Sweep compact_kv_'s block_k (not autotuned: the kernel works in place)."""
    print("\ncompaction block_k")
    keep = int(round(args.budget * args.seq_len))
    kc = torch.full((args.requests,), keep, dtype=torch.int32, device="cuda")
    keep_idx = select_keep_indices(scores, sl, kc, args.sinks, args.recent, max_keep=keep)
    work = kv.clone()
    for bk in (32, 64, 128):
        ms = median_ms(functools.partial(compact_kv_, work, pt, keep_idx, kc, block_k=bk), rep=60)
        print(f"block_k={bk}: {ms:.3f} ms", flush=True)
    del work
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--pool", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--copy-pages", type=int, default=8192, help="pages moved by copy_pages_")
    ap.add_argument(
        "--tune",
        action="store_true",
        help=f"autotune score_gather's kernels at this shape ({AUTOTUNE_ENV}=1; prints every config's time) "
        "and sweep compact_kv_'s block_k",
    )
    ap.add_argument("--only-score", action="store_true", help="run score_gather once each way and exit (for ncu)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.tune:
        # the first score_gather call of each autotune key (the checks below, at this shape) times every candidate
        os.environ[AUTOTUNE_ENV] = "1"
    torch.manual_seed(0)
    dev = "cuda"
    R, S, Hkv, Hq = args.requests, args.seq_len, args.hkv, args.hq
    D, W, bs = args.head_dim, args.window, args.block_size
    dtype = torch.bfloat16
    esize = 2
    scale = D**-0.5
    results = []

    # ---- copy bandwidth ------------------------------------------------------
    n = 1 << 30  # 2 GiB of bf16 each way
    src_buf = torch.randn(n, device=dev, dtype=torch.float32).to(dtype)
    dst_buf = torch.empty_like(src_buf)
    copy_ms = median_ms(functools.partial(dst_buf.copy_, src_buf))
    copy_gbps = 2 * n * esize / copy_ms / 1e6
    del src_buf, dst_buf
    print(f"device-to-device copy: {copy_ms:.3f} ms, {copy_gbps:.0f} GB/s (read + write)", flush=True)

    # ---- inputs ----------------------------------------------------------------
    ppr = triton.cdiv(S, bs)
    spare = args.copy_pages
    num_pages = R * ppr + spare
    kv = torch.randn((num_pages, 2, bs, Hkv, D), device=dev, dtype=torch.float32).to(dtype)  # random, never zeros
    perm = torch.randperm(num_pages, device=dev).to(torch.int32)
    pt = perm[: R * ppr].view(R, ppr).contiguous()  # scrambled pages
    spare_pages = perm[R * ppr :]
    sl = torch.full((R,), S, dtype=torch.int32, device=dev)
    wl = torch.full((R,), W, dtype=torch.int32, device=dev)
    q = torch.randn((R, W, Hq, D), device=dev).to(dtype)
    key_bytes = R * S * Hkv * D * esize
    print(
        f"cache {kv.numel() * esize / 1e9:.2f} GB; keys of the layer {key_bytes / 1e9:.3f} GB "
        f"(L2 is {torch.cuda.get_device_properties(0).L2_cache_size / 1e6:.0f} MB: no input rotation needed)",
        flush=True,
    )

    # ---- correctness once (fp32 torch) -----------------------------------------
    ref_scores, ref_mass, lse = torch_scores(
        q, kv, pt, S, scale, args.pool, compute_dtype=torch.float32, return_lse=True
    )
    kw = dict(scale=scale, pool_kernel=args.pool, pool_type="max", square=False, max_seq_len=S)
    out1 = score_gather(q, wl, kv, pt, sl, window_lse=lse, **kw)
    out2 = score_gather(q, wl, kv, pt, sl, window_lse=None, **kw)
    errs = {
        "score_gather": (rel(out1.scores, ref_scores), rel(out1.mass, ref_mass)),
        "score_gather_two_pass": (rel(out2.scores, ref_scores), rel(out2.mass, ref_mass)),
    }
    for k, (es, em) in errs.items():
        print(f"check {k}: rel err scores {es:.2e}, mass {em:.2e}", flush=True)
        assert es < 1e-2 and em < 1e-2, f"{k} disagrees with torch"
    del ref_scores, ref_mass
    torch.cuda.empty_cache()
    if args.only_score:
        torch.cuda.synchronize()
        return

    # ---- launch configurations (chosen by autotune during the checks) ----------------
    launch_configs = report_launch_configs(args.tune)
    if args.tune:
        tune_compaction(args, kv, pt, sl, out1.scores)

    # ---- score_gather timings -------------------------------------------------------
    t_torch = median_ms(lambda: torch_scores(q, kv, pt, S, scale, args.pool), warmup=5, rep=100)
    print(f"torch scores (bf16 matmul): {t_torch:.3f} ms", flush=True)
    shape = f"R={R} S={S} Hkv={Hkv} Hq={Hq} D={D} W={W} block={bs} bf16 pool={args.pool} max"
    for name, lse_arg in (("score_gather", lse), ("score_gather_two_pass", None)):
        ms = median_ms(functools.partial(score_gather, q, wl, kv, pt, sl, window_lse=lse_arg, **kw))
        gbps = key_bytes / ms / 1e6
        results.append(
            dict(
                name=name,
                shape=shape,
                median_ms=ms,
                gbps=gbps,
                fraction_of_copy=gbps / copy_gbps,
                speedup_vs_torch=t_torch / ms,
                bytes=key_bytes,
                torch_ms=t_torch,
                rel_err_scores=errs[name][0],
                rel_err_mass=errs[name][1],
            )
        )
        print(f"{name}: {ms:.3f} ms", flush=True)

    # ---- compaction -----------------------------------------------------------------
    keep = int(round(args.budget * S))
    kc = torch.full((R,), keep, dtype=torch.int32, device=dev)
    keep_idx = select_keep_indices(out1.scores, sl, kc, args.sinks, args.recent, max_keep=keep)
    sel_ms = median_ms(
        lambda: select_keep_indices(out1.scores, sl, kc, args.sinks, args.recent, max_keep=keep, validate=False)
    )
    a = kv.clone()
    b = kv.clone()
    compact_kv_(a, pt, keep_idx, kc, seq_lens=sl, validate=True)
    torch_compact(b, pt, keep_idx, [keep] * R)
    assert torch.equal(a, b), "compaction disagrees with torch"
    print("check compaction: bit-identical to torch", flush=True)
    del b
    torch.cuda.empty_cache()
    moved = int((keep_idx[:, :, :keep] != torch.arange(keep, device=dev)).sum())
    comp_bytes = R * Hkv * keep * D * esize * 2 * 2  # kept K+V, read + written
    # in place and idempotent in cost: the same index pattern moves the same bytes each call
    ms_c = median_ms(functools.partial(compact_kv_, a, pt, keep_idx, kc))
    t_torch_c = median_ms(functools.partial(torch_compact, a, pt, keep_idx, [keep] * R))
    gbps = comp_bytes / ms_c / 1e6
    results.append(
        dict(
            name="compaction",
            shape=f"R={R} S={S} Hkv={Hkv} D={D} block={bs} bf16 keep={keep} "
            f"(budget {args.budget}, sinks {args.sinks}, recent {args.recent})",
            median_ms=ms_c,
            gbps=gbps,
            fraction_of_copy=gbps / copy_gbps,
            speedup_vs_torch=t_torch_c / ms_c,
            bytes=comp_bytes,
            torch_ms=t_torch_c,
            moved_fraction=moved / (R * Hkv * keep),
            select_keep_indices_ms=sel_ms,
        )
    )
    print(f"compaction: {ms_c:.3f} ms (torch {t_torch_c:.3f} ms); select_keep_indices {sel_ms:.3f} ms", flush=True)
    # layer_share=k (issue #13 item 4) scores one layer in k; selection and compaction stay per layer.
    # The share of a layer's eviction kernel time it saves, from this run's measured times:
    score_ms = next(r["median_ms"] for r in results if r["name"] == "score_gather")
    per_layer_ms = score_ms + sel_ms + ms_c
    layer_share_saving = {
        str(k): {"saved_fraction": (1 - 1 / k) * score_ms / per_layer_ms, "per_layer_ms": per_layer_ms} for k in (2, 4)
    }
    saved = layer_share_saving["2"]["saved_fraction"]
    print(f"layer_share 2 saves {saved:.0%} of the eviction kernel time", flush=True)
    del a
    torch.cuda.empty_cache()

    # ---- copy_pages -------------------------------------------------------------------
    npc = min(args.copy_pages, spare_pages.numel())
    srcp = perm[torch.randperm(R * ppr, device=dev)[:npc]]
    dstp = spare_pages[:npc].contiguous()
    a = kv.clone()
    copy_pages_(a, srcp, dstp, validate=True)
    b = kv.clone()
    b[dstp.long()] = b[srcp.long()]
    assert torch.equal(a, b), "copy_pages_ disagrees with torch"
    del a, b
    page_bytes = kv[0].numel() * esize
    cp_bytes = 2 * npc * page_bytes
    ms_p = median_ms(lambda: copy_pages_(kv, srcp, dstp))
    srcl, dstl = srcp.long(), dstp.long()
    t_torch_p = median_ms(lambda: kv.index_copy_(0, dstl, kv.index_select(0, srcl)))
    gbps = cp_bytes / ms_p / 1e6
    results.append(
        dict(
            name="copy_pages",
            shape=f"{npc} pages of {page_bytes} B",
            median_ms=ms_p,
            gbps=gbps,
            fraction_of_copy=gbps / copy_gbps,
            speedup_vs_torch=t_torch_p / ms_p,
            bytes=cp_bytes,
            torch_ms=t_torch_p,
        )
    )
    print(f"copy_pages: {ms_p:.3f} ms (torch {t_torch_p:.3f} ms)", flush=True)

    # ---- report ------------------------------------------------------------------------------
    report = {
        "command": "python bench/kernels_bench.py " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "copy_gbps": copy_gbps,
        "autotuned": bool(args.tune),
        "launch_configs": launch_configs,
        "kernels": results,
        "layer_share_saving": layer_share_saving,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {path}\n")
    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {report['device']}\n")
    print("| kernel | median ms | GB/s | of copy BW | torch ms | speedup vs torch |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['median_ms']:.3f} | {r['gbps']:.0f} | {r['fraction_of_copy']:.2f} | "
            f"{r['torch_ms']:.3f} | {r['speedup_vs_torch']:.1f}x |"
        )


if __name__ == "__main__":
    main()
