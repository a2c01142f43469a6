"""Collect benchmarks/results/*.json into the Markdown table the README links to
(benchmarks/results/README.md). Sections whose JSON is missing are listed as not run.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

from oneepoch.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | list | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def speedup_lines(result: dict, how: str) -> list[str]:
    """The speed-up of each thread count over the first one, as recorded by the benchmark."""
    first = result["runs"][0]["threads"]
    return [f"\n{t} threads vs {first}: {x:.2f}x ({how})"
            for t, x in (result.get("speedup_per_round_median") or {}).items()
            if int(t) != first]


def main() -> None:
    out = ["# Benchmark results", "",
           "Written by `make bench` (benchmarks/summarize.py) from the JSON files beside this one; "
           "measured on the machine named in `core.json`. Re-run `make bench` to refresh.", ""]
    core = load("core")
    out += ["## Base CTR model (paper A), oneepoch", ""]
    if core:
        out += ["| threads | train samples/s (median) | rounds (min-max) "
                "| of the GEMM ceiling, same rounds | eval rows/s "
                "| AUC over 10^7 (s) | peak RSS (MiB) |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in core["runs"]:
            rounds = r.get("train_rounds") or [float("nan")]
            frac = r.get("fraction_of_gemm_ceiling")
            frac_s = (f"{100 * frac:.0f}% ({r['gemm_gflops']:.0f} GFLOP/s)"
                      if frac is not None else "-")
            out.append(f"| {r['threads']} | {r['train_samples_per_s']:,.0f} | "
                       f"{min(rounds):,.0f}-{max(rounds):,.0f} | {frac_s} | "
                       f"{r.get('eval_rows_per_s', float('nan')):,.0f} | "
                       f"{r.get('auc_1e7_seconds', float('nan')):.2f} | "
                       f"{r.get('peak_rss_mib', core.get('peak_rss_mib', float('nan'))):,.0f} |")
        out += speedup_lines(core, "median of the per-round ratios; thread counts alternate "
                             "round by round inside each process")
        for t, x in (core.get("gemm_speedup_per_round_median") or {}).items():
            if int(t) != core["runs"][0]["threads"]:
                out.append(f"\nThe machine's own {t}-thread speed-up on the MLP's GEMMs alone, "
                           f"timed in the same rounds: {x:.2f}x")
        profiled = [r for r in core["runs"] if r.get("profile_ms")]
        if profiled:
            phases = list(profiled[0]["profile_ms"])
            out += ["", f"Where a step goes ({profiled[0].get('step', 'fused')} step, ms per "
                    "batch, thread 0's view with barrier waits, median of processes):", "",
                    "| threads | " + " | ".join(phases) + " | total |",
                    "|---:|" + "---:|" * (len(phases) + 1)]
            for r in profiled:
                v = r["profile_ms"]
                out.append(f"| {r['threads']} | " + " | ".join(f"{v[k]:.3f}" for k in phases)
                           + f" | {sum(v.values()):.2f} |")
    else:
        out.append("not run")
    limit = load("limit")
    out += ["", "## The machine's limit (MLP GEMMs)", ""]
    if limit and core:
        out += ["| threads | GEMM GFLOP/s | compute ceiling (samples/s) | oneepoch's fraction |",
                "|---:|---:|---:|---:|"]
        speed = {r["threads"]: r["train_samples_per_s"] for r in core["runs"]}
        for r in limit["runs"]:
            frac = speed.get(r["threads"], float("nan")) / r["ceiling_samples_per_s"]
            out.append(f"| {r['threads']} | {r['gflops']:.1f} | {r['ceiling_samples_per_s']:,.0f} "
                       f"| {100 * frac:.0f}% |")
        out.append(f"\n{limit['flops_per_sample'] / 1e3:.0f} kFLOP per sample (forward + backward)")
    else:
        out.append("not run")
    pair = load("pair")
    out += ["", "## Two cores, two ways (paper A's base model)", ""]
    if pair:
        out += [f"Per round, {pair['seconds']} s each: one 1-thread training alone, two 1-thread "
                "trainings at once (separate processes: nothing shared, no synchronisation), "
                "one 2-thread training; medians over "
                f"{len(pair['rounds'])} rounds of the ratios to the round's 1-thread speed.", "",
                "| setup | speed-up over one thread |", "|---|---:|",
                f"| two 1-thread runs at once (summed) | {pair['pair_speedup']:.2f}x |",
                f"| one 2-thread run | {pair['two_thread_speedup']:.2f}x "
                f"({100 * pair['two_thread_of_pair']:.0f}% of the pair) |"]
    else:
        out.append("not run")
    peers = load("peers")
    out += ["", "## Side by side with peers (one epoch, alternating runs, medians)", ""]
    if peers:
        out += ["| threads | system | median samples/s | oneepoch / system (medians) "
                "| per round | runs | errors |",
                "|---:|---|---:|---:|---:|---:|---|"]
        speed = {(r["system"], r["threads"], r["round"]): r.get("samples_per_s")
                 for r in peers["runs"]}
        for r in peers["summary"]:
            m = r["median_samples_per_s"]
            ratio = r.get("oneepoch_over_system")
            # the ratio round by round (runs next to each other share the machine's state)
            paired = [speed[("oneepoch", r["threads"], k)] / speed[(r["system"], r["threads"], k)]
                      for k in range(peers["rounds"])
                      if speed.get(("oneepoch", r["threads"], k))
                      and speed.get((r["system"], r["threads"], k))]
            per = ", ".join(f"{x:.1f}x" for x in paired)
            per = per if r["system"] != "oneepoch" else ""
            out.append(f"| {r['threads']} | {r['system']} | {f'{m:,.0f}' if m else '-'} | "
                       f"{f'{ratio:.1f}x' if ratio else '-'} | {per} | {r['n']} | "
                       f"{'; '.join(e[:120] for e in r['errors'])} |")
        out.append(f"\n{peers['rows']:,} training rows, batch {peers['batch']}, "
                   f"{peers['rounds']} rounds.")
    else:
        out.append("not run")
    scale = load("scale")
    out += ["", "## Table size (10^5 vs 10^7 item IDs, one thread)", ""]
    if scale:
        out += ["| dim | item IDs | step (ms, wall) | step (ms, CPU) | peak RSS (MiB) |",
                "|---:|---:|---:|---:|---:|"]
        for r in scale:
            out.append(f"| {r['dim']} | {r['n_items']:,} | {r['step_ms_wall']:.2f} | "
                       f"{r['step_ms_cpu']:.2f} | {r['peak_rss_mib']:,.0f} |")
        ratios = [f"dim {r['dim']} {r['ratio_to_1e5_median']:.2f}x ("
                  + ", ".join(f"{x:.2f}" for x in r["ratio_to_1e5_pairs"]) + ")"
                  for r in scale if "ratio_to_1e5_median" in r]
        if ratios:
            out.append("\n10^7 / 10^5 step time (CPU), median of the process pairs run back to "
                       "back: " + "; ".join(ratios))
    else:
        out.append("not run")
    pre = load("pretrain")
    out += ["", "## Stage-1 pre-training (paper B)", ""]
    if pre and pre.get("runs") and "gemm_gflops" in pre["runs"][0]:
        sh = pre["shape"]
        out += ["| threads | pairs/s | step (ms) | GEMM bound (pairs/s) "
                "| GEMM GFLOP/s (block rows) | fraction of bound | per round (min-max) "
                "| full-catalogue eval (pairs/s) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pre["runs"]:
            ev = r.get("eval_pairs_per_s")
            fr = r.get("fraction_of_bound_rounds")
            span = f"{100 * min(fr):.0f}-{100 * max(fr):.0f}%" if fr else "-"
            out.append(f"| {r['threads']} | {r['pairs_per_s']:,.0f} | {r['step_ms']:.0f} | "
                       f"{r['gemm_bound_pairs_per_s']:,.0f} | {r['gemm_gflops']:.0f} "
                       f"({r['gemm_block_rows']}) | {100 * r['fraction_of_bound']:.0f}% | {span} | "
                       f"{f'{ev:,.0f}' if ev else '-'} |")
        out += speedup_lines(pre, "median of the per-round ratios")
        out.append(f"\ndim {sh['dim']}, batch {sh['batch']} + {sh['uniform_negatives']} uniform "
                   f"negatives (and in-batch), {sh['rows']:,}-row user and item tables; the "
                   "bound is the step's three GEMMs timed alone in their fastest row blocking, "
                   "right after the step in each round; the fraction is the median of the "
                   "per-round fractions; "
                   "evaluation ranks held-out pairs against every item.")
    else:
        out.append("not run")
    risk = load("risk")
    out += ["", "## Diagnostics: `data risk` and per-bucket AUC", ""]
    if risk:
        r, b = risk.get("risk"), risk["buckets"]
        if r:
            out.append(f"`data risk` over {r['rows']:,} training + {r['io']['test_rows']:,} test "
                       f"rows ({r['file_gib']:.2f} GiB of Parquet, 3 int ID fields): "
                       f"{r['seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s), peak RSS "
                       f"{r['peak_rss_mib']:,.0f} MiB.")
        out.append(f"\nPer-bucket test AUC: {1e3 * b['bucket_seconds_median']:.1f} ms per "
                   f"evaluation of {b['test_rows']:,} test rows, "
                   f"{100 * b['bucket_share_of_eval']:.1f}% of the evaluation it rides on "
                   f"({1e3 * b['eval_seconds_median']:.0f} ms, one thread).")
    else:
        out.append("not run")
    mon = load("monitor")
    out += ["", "## The monitor in a user's own loop (outside evaluation)", ""]
    if mon:
        out.append(f"`Monitor.step(loss)`: {mon['monitor_step_us_tensor']:.2f} us with a tensor "
                   f"loss, {mon['monitor_step_us_float']:.2f} us with a float, against "
                   f"{mon['base_step_ms']:.2f} ms for one {mon['step_path']} step of the base "
                   f"model (batch {mon['batch']}, 1 thread): "
                   f"{mon['overhead_pct_of_step']:.3f}% of a step (bound {mon['bound_pct']:g}%).")
    else:
        out.append("not run")
    dist = load("dist")
    out += ["", "## Across processes (gloo, one thread per process)", ""]
    if dist:
        out += ["| model | global batch | one process | distributed x1 | distributed x2 "
                "| x2 / x1 | two independent runs / one | x1 / one process "
                "| x2: sync, update share of the step |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        rows = dist.get("ctr_by_batch") or ([dist["ctr"]] if dist.get("ctr") else [])
        for d, name in [*((d, "base model (samples/s)") for d in rows),
                        (dist.get("stage1"), "stage 1 (pairs/s)")]:
            if d:
                m = d["median"]
                where = (f"{d['sync_share']:.0%}, {d['update_share']:.0%}"
                         if "sync_share" in d else "")
                out.append(f"| {name} | {d.get('batch', '')} | {m['singlex1']:,.0f} "
                           f"| {m['distx1']:,.0f} | {m['distx2']:,.0f} "
                           f"| {d['speedup_2_over_1_dist']:.2f}x "
                           f"| {d.get('machine_ceiling_2_over_1', float('nan')):.2f}x "
                           f"| {d['dist1_over_single']:.2f} | {where} |")
        for key, name, unit in (("ctr_sharded_x2", "The base model", "samples"),
                                ("stage1_sharded_x2", "Stage 1", "pairs")):
            sh = dist.get(key)
            if sh:
                out += ["", f"{name} with TorchRec-sharded tables on 2 processes ({sh['plan']}, "
                        f"{sh['optimizer']}): {sh[unit + '_per_s']:,.0f} {unit}/s."]
        out += ["", f"Sharding plan: {dist.get('sharding_plan')}; load average during the "
                f"runs: {dist.get('loadavg')}."]
    else:
        out.append("not run")
    for name, title in (("prepare_taobao", "Preparing Taobao UserBehavior"),):
        data = load(name)
        out += ["", f"## {title}", ""]
        out.append("```json\n" + json.dumps(data, indent=1)[:3000] + "\n```" if data
                   else "not run")
    atomic_write_text(RESULTS / "README.md", "\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
