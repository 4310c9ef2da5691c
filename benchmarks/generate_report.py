"""The report of a generation benchmark run (bench_generate.py): its table, one row per metric with a
column per implementation and the ratios beside them, the ratios by name, and the notes printed under
the table; with --out, the run written with its table, ratios and the README's headline numbers.

Measured runs and stored ones (--report) go through `summarize` alike, so both print the same table.
"""
from typing import Callable, Optional

import torch

from common import GB, envelope, print_table, write_json

# Ratios printed under the table: (name, numerator, denominator or a tuple whose best is taken)
POLICY_VS_FORCED = ("ours", ("ours-bf16", "ours-f32"))
SAME_PRECISION = (
    ("ours-bf16", "llama.cpp-BF16"), ("ours-int8", "llama.cpp-Q8_0"), ("ours-w8a8", "llama.cpp-Q8_0"),
    ("ours-int4", "llama.cpp-Q4_0"),
)
QUANT_VS_BF16 = (("ours-int8", "ours-bf16"), ("ours-w8a8", "ours-bf16"), ("ours-int4", "ours-bf16"))


def decode_share(entry: dict, bytes_: dict, ceiling: float) -> float:
    """Measured tokens/s over what the bandwidth ceiling allows for this step's reads."""
    batch = entry["batch"]
    step_bytes = bytes_["weights"] + batch * entry["context"] * bytes_["kv_per_token"]
    return entry["tokens_per_s"] / (batch * ceiling * GB / step_bytes)


def impl_bytes(result: dict, bytes_: dict, itemsize: int) -> dict:
    """Bytes a decode step of this implementation reads: its own weights as loaded (quantized, or in
    the dtype its policy holds them in) where it reported them, else the run's dtype."""
    if "weight_bytes" not in result:
        return bytes_
    kv = bytes_["kv_per_token"] // itemsize * result["kv_itemsize"]
    return {"weights": result["weight_bytes"], "kv_per_token": kv}


def having(results: dict, *keys: str) -> dict:
    """{impl: results[impl][keys[0]][keys[1]]...} for the implementations that reported that value."""
    out = {}
    for i, r in results.items():
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        if r is not None:
            out[i] = r
    return out


def ratio(value: float, ref: float, higher_better: bool) -> float:
    """How many times better `value` is than `ref`: above 1 is better, whichever way the metric goes."""
    return value / ref if higher_better else ref / value


class Report:
    """The table's rows and the ratios by name, filled one metric at a time by `add`."""

    def __init__(self, results: dict, bw: dict) -> None:
        self.results, self.bw = results, bw
        self.ours = [i for i in results if i.startswith("ours")]
        self.main = [i for i in self.ours if i in ("ours", "ours-compile")]
        self.hf = [i for i in results if i.startswith("hf-")]
        self.forced = [i for i in POLICY_VS_FORCED[1] if i in results]
        self.rows: list = []
        self.ratios: dict = {}

    def add(
        self, metric: str, values: dict, higher_better: bool = True, share: Optional[Callable] = None,
        speed: bool = False,
    ) -> None:
        """A row of `values` ({impl: value}) with its ratios; `share(impl, GB/s)` gives a decode figure's
        share of a bandwidth, `speed` adds the policy over forced dtypes."""
        row = {"metric": metric, **values}
        self._vs_hf(row, metric, values, higher_better)
        if speed:
            self._vs_forced(row, metric, values, higher_better)
        for num, den in (*QUANT_VS_BF16, *SAME_PRECISION):
            if num in values and den in values:
                self.ratios[f"{metric}: {num} / {den}"] = values[num] / values[den]  # as measured: speed-up or fraction
        if share:
            self._shares(row, metric, values, share)
        self.rows.append(row)

    def _vs_hf(self, row: dict, metric: str, values: dict, higher_better: bool) -> None:
        """Ours and ours compiled over the best transformers run."""
        hf_values = [values[i] for i in self.hf if i in values]
        if not hf_values:
            return
        ref = (max if higher_better else min)(hf_values)
        for o in self.main:
            if o in values:
                row[f"{o} / hf"] = self.ratios[f"{metric}: {o} / best hf"] = ratio(values[o], ref, higher_better)

    def _vs_forced(self, row: dict, metric: str, values: dict, higher_better: bool) -> None:
        """The default dtype policy over the better of forced bfloat16 and float32."""
        policy = POLICY_VS_FORCED[0]
        if policy in values and len(self.forced) == 2 and all(f in values for f in self.forced):
            ref = (max if higher_better else min)(values[f] for f in self.forced)
            row["ours / best forced"] = self.ratios[f"{metric}: ours / best of forced bf16, f32"] = ratio(
                values[policy], ref, higher_better
            )

    def _shares(self, row: dict, metric: str, values: dict, share: Callable) -> None:
        """Shares of the bandwidth ceiling, and of the best one-row GEMV seen (the kernel's own limit)."""
        ceiling, gemv = self.bw["ceiling"], self.bw["gemv"]
        for o in self.ours:
            if o in values:
                row[f"{o} / ceiling"] = self.ratios[f"{metric}: {o} / ceiling"] = share(o, ceiling)
        if any(i in values for i in self.hf):
            row["hf / ceiling"] = max(share(i, ceiling) for i in self.hf if i in values)
        for o in self.main:
            if o in values:
                row[f"{o} / gemv"] = self.ratios[f"{metric}: {o} / gemv"] = share(o, gemv)


def add_decode_rows(report: Report, bytes_: dict, itemsize: int) -> None:
    """A row per decode scenario (batch and context), in the order the implementations ran them."""
    results = report.results
    decode_keys = list(dict.fromkeys(k for r in results.values() for k in r.get("decode", {})))
    for key in decode_keys:
        entries = having(results, "decode", key)
        e = next(iter(entries.values()))
        report.add(
            f"decode tok/s, batch {e['batch']}, context {round(e['context'])}",
            {i: x["tokens_per_s"] for i, x in entries.items()},
            speed=True,
            share=lambda i, bw_gb_s, entries=entries: decode_share(
                entries[i], impl_bytes(results[i], bytes_, itemsize), bw_gb_s
            ),
        )


def add_prompt_rows(report: Report) -> None:
    """Prefill speed and time to first token of one prompt, then the mixed batch end to end (and ours'
    original one-token-per-step feeding of it)."""
    results = report.results
    prefill = having(results, "prefill")
    n_prefill = next(iter(prefill.values()))["tokens"]
    report.add(f"prefill tok/s, {n_prefill}-token prompt", {i: r["tokens_per_s"] for i, r in prefill.items()},
               speed=True)
    report.add("time to first token, s", {i: r["ttft_s"] for i, r in prefill.items()}, higher_better=False)
    mixed = having(results, "mixed")
    if mixed:
        lens = next(iter(mixed.values()))["lens"]
        report.add(f"batch of 8, {lens[0]}..{lens[-1]} tokens, end-to-end tok/s",
                   {i: r["tokens_per_s"] for i, r in mixed.items()})
    if "original_loop" in results.get("ours", {}):
        base = results["ours"]["original_loop"]["tokens_per_s"]
        report.rows.append({"metric": "  the same, original one-token-per-step feeding", "ours": base})
        report.ratios["batch of 8: ours / original loop"] = results["ours"]["mixed"]["tokens_per_s"] / base


def add_cost_rows(report: Report) -> None:
    """Load time, memory and file size; GPU memory only when every implementation reported it."""
    for metric, key in (("load time, s", "load_s"), ("peak resident memory after loading, GB", "load_peak_rss_gb"),
                        ("peak resident memory, GB", "peak_rss_gb"), ("model file, GB", "file_gb")):
        values = having(report.results, key)
        if values:
            report.add(metric, values, higher_better=False)
    gpu = having(report.results, "peak_gpu_gb")
    if gpu and len(gpu) == len(having(report.results, "load_s")):
        report.add("peak GPU memory, GB", gpu, higher_better=False)


def report_rows(results: dict, bw: dict, bytes_: dict, itemsize: int = 2) -> tuple[list, dict]:
    """Table rows: each metric per implementation; for ours and ours compiled their ratio to the
    best transformers run; for decode each of ours' share of the bandwidth ceiling (and of the GEMV
    rate); the default policy over the better of forced bfloat16 and float32. Also the ratios by name:
    those, quantized over bfloat16, and ours beside llama.cpp at each precision."""
    report = Report(results, bw)
    add_decode_rows(report, bytes_, itemsize)
    add_prompt_rows(report)
    add_cost_rows(report)
    return report.rows, report.ratios


def summarize(run: dict, out: Optional[str], itemsize: Optional[int] = None) -> None:
    """Print the table, the ratios and the notes of a run (results, bandwidth_gb_s, bytes, skipped);
    with `out`, write the run there with its table and ratios."""
    results, skipped = run["results"], run.get("skipped", {})
    itemsize = itemsize or getattr(torch, run.get("dtype", "bfloat16")).itemsize
    rows, ratios = report_rows(results, run["bandwidth_gb_s"], run["bytes"], itemsize)
    print()
    print_table(rows)
    print()
    if "batch of 8: ours / original loop" in ratios:
        print(f"batch of 8 of mixed lengths: ours is {ratios['batch of 8: ours / original loop']:.2f}x the original's "
              "one-token-per-step prompt feeding on the same model")
    if "hf-eager" in results and "ours" in results:
        same = sum(a == b for a, b in zip(results["ours"]["greedy_tokens"], results["hf-eager"]["greedy_tokens"]))
        print(f"greedy tokens of ours and hf-eager agree on {same}/{len(results['ours']['greedy_tokens'])} (short decode, batch 1)")
    for name, value in ratios.items():
        if "best of forced" in name or any(f"{a} / {b}" in name for a, b in (*QUANT_VS_BF16, *SAME_PRECISION)):
            print(f"{name}: {value:.2f}")
    for impl, r in results.items():
        if "policy" in r:
            print(f"{impl}: {r['policy']}")
    for impl, why in skipped.items():
        print(f"{impl} skipped: {why}")
    if out:
        own = {k: v for k, v in run.items() if k not in ("benchmark", "machine", "date", "command", "torch", "headline")}
        write_json(out, envelope("generate", {**own, "table": rows, "ratios": ratios}, headline=headline(rows)))
        print(f"wrote {out}")


def headline(rows: list) -> list:
    """The README's numbers from a run: ours' batch-1 decode and prefill speed and its peak memory."""
    wanted = ("decode tok/s, batch 1", "prefill tok/s", "peak resident memory")
    return [{"metric": f"{r['metric']} (ours)", "value": r["ours"]} for r in rows
            if r.get("ours") is not None and r["metric"].startswith(wanted)]
