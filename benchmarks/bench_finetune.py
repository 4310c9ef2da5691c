#!/usr/bin/env python
"""Fine-tuning speed and memory on a CPU: llama-finetune's training step beside TRL's SFTTrainer
(with PEFT for LoRA), on the same weights and the same token rows.

  python benchmarks/bench_finetune.py                      # the 1B shape cut to 2 layers: a few minutes
  python benchmarks/bench_finetune.py --layers 16          # the whole Llama 3.2 1B shape (~20 GB for full SFT)

The shape is Llama 3.2 1B's (dim 2048, 32 heads, 8 KV heads, FFN 8192, vocabulary 128256, tied
embedding), with --layers blocks, random weights written once as a Meta checkpoint and converted to
Hugging Face with llama.weights.convert. Both sides train on the same rows of --seq_len random tokens
(every token trains; no packing, no padding), --batch rows per step, AdamW (betas 0.9/0.95, no
weight decay), clipping at 1.0, float32 weights and products (--bf16: bfloat16 autocast on both), no
evaluation, no saving, activation checkpointing the same on both (--activation_checkpointing).

Each (implementation, method) runs in a fresh process, so its peak resident memory (VmHWM) is its
own; tokens/s counts the input tokens of the timed steps (the first step is a warm-up, not timed)
over their wall time; the CPU time of the same steps (every thread of the process) is reported
too, as its ratio: on a machine shared with other work it moves less than the wall time does.
The configurations alternate (ours, TRL, then TRL, ours on the next repeat) so that a machine
shared with other work slows both alike; compare numbers of one run only.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from common import GIB, envelope, peak_rss, random_state_dict, write_json
from llama import cli

SHAPE_1B = {"dim": 2048, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
            "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
LORA_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
IMPLS, METHODS = ("ours", "trl"), ("full", "lora")
LR = 1e-5


def token_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n_rows, seq_len + 1) random ordinary tokens: inputs are [:-1], targets [1:]."""
    return torch.randint(0, vocab - 256, (n_rows, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def run_ours(ckpt: str, rows: torch.Tensor, cfg: dict) -> list[tuple[float, float]]:
    """llama.train's own model building and training step; (wall, CPU) seconds of each step."""
    from llama import distributed
    from llama.train import data, loop
    from llama.train.finetune import build_model
    from llama.train.optim import make_optimizer

    dev = torch.device("cpu")
    distributed.setup(dev)
    steps = cfg["steps"] + 1
    settings = {"lora_rank": cfg["rank"], "lora_alpha": 2.0 * cfg["rank"], "lora_targets": list(LORA_TARGETS),
                "lora_dropout": 0.0, "rslora": False, "base_quantize": None, "max_seq_len": cfg["seq_len"],
                "dtype": "float32", "activation_checkpointing": cfg["ac"], "max_steps": steps, "warmup": 0, "lr": LR,
                "min_lr": LR, "batch_size": cfg["batch"], "seed": 0, "method": "sft", "grad_accum": 1,
                "packing": False, "max_grad_norm": 1.0, "eval_every": 0}
    model, adapter = build_model(ckpt, settings, dev, torch.float32, torch.bfloat16 if cfg["bf16"] else None)
    items = [data.Row(r[:-1].tolist(), r[1:].tolist(), list(range(len(r) - 1))) for r in rows]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg["bf16"] else contextlib.nullcontext
    run = loop.Loop(model, make_optimizer(model, LR, 0.0), items, [], settings, Path(cfg["tmp"]), dev, autocast,
                    adapter is not None)
    times = []
    for step in range(steps):
        start = (time.perf_counter(), time.process_time())
        run.train_step(step)
        times.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    return times


def run_trl(hf_dir: str, rows: torch.Tensor, cfg: dict) -> list[tuple[float, float]]:
    """TRL's SFTTrainer (PEFT's LoRA for lora) on the converted weights; (wall, CPU) seconds of each step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_config = None
    if cfg["rank"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], lora_dropout=0.0, bias="none",
                                 target_modules=list(LORA_TARGETS.values()), task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=cfg["tmp"], per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
        max_steps=cfg["steps"] + 1, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=10**6, use_cpu=True, bf16=cfg["bf16"],
        gradient_checkpointing=cfg["ac"], max_length=cfg["seq_len"], packing=False, dataloader_num_workers=0,
        seed=0, disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"input_ids": rows[:, :-1].tolist()})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return times


def measure(impl: str, method: str, work: str, cfg: dict) -> dict:
    """One configuration, in this (fresh) process: tokens/s over the timed steps and peak RSS."""
    torch.manual_seed(0)
    cfg = dict(cfg, rank=cfg["rank"] if method == "lora" else 0, tmp=tempfile.mkdtemp(dir=work))
    rows = token_rows(cfg["batch"] * (cfg["steps"] + 1), cfg["seq_len"], SHAPE_1B["vocab_size"])
    fn = run_ours if impl == "ours" else run_trl
    times = fn(str(Path(work) / ("meta" if impl == "ours" else "hf")), rows, cfg)
    timed = times[1:]
    tokens = cfg["batch"] * cfg["seq_len"] * len(timed)
    return {"impl": impl, "method": method, "tokens_per_s": tokens / sum(w for w, _ in timed),
            "tokens_per_cpu_s": tokens / sum(c for _, c in timed), "step_s": [w for w, _ in timed],
            "peak_rss_gib": peak_rss() / GIB}


def run_child(impl: str, method: str, work: Path, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"impl": impl, "method": method, "work": str(work), "cfg": cfg})]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{impl} {method} failed: {r.stderr.strip()[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(work: Path, layers: int) -> None:
    """The random Meta checkpoint (bfloat16 values, so both sides start from the same numbers) and its
    Hugging Face conversion, with the demo tokenizer (the rows are token ids; TRL wants a tokenizer)."""
    from llama.demo import TOKENIZER_PATH
    from llama.weights.convert import to_hf
    from llama.weights.save import save_checkpoint

    params = dict(SHAPE_1B, n_layers=layers)
    # tied, as the 3.2 1B's is: no output.weight, and the converter ties the HF model's head
    save_checkpoint(random_state_dict(params, torch.bfloat16, tied=True), params, work / "meta")
    shutil.copyfile(TOKENIZER_PATH, work / "meta" / "tokenizer.model")
    to_hf(str(work / "meta"), str(work / "hf"), dtype="bfloat16")


def main(
    layers: int = 2,
    seq_len: int = 256,
    batch: int = 2,
    steps: int = 2,
    rank: int = 16,
    activation_checkpointing: bool = False,
    bf16: bool = False,
    repeats: int = 1,
    methods: str = "full,lora",
    out: Optional[str] = None,
    child: Optional[str] = None,
) -> None:
    """Training tokens/s and peak memory of llama-finetune's step beside TRL's SFTTrainer.

    Args:
        layers: blocks of the 1B shape (16: the whole Llama 3.2 1B).
        seq_len: tokens per row; batch: rows per optimizer step; steps: timed steps (after one warm-up).
        rank: LoRA rank (alpha 2 * rank) on wq, wk, wv, wo (q/k/v/o_proj).
        activation_checkpointing: recompute each block's activations in the backward pass, on both sides.
        bf16: bfloat16 autocast over float32 weights on both sides (default: float32 throughout).
        repeats: runs of each configuration (fresh processes, alternating); the best tokens/s and
            the highest peak are reported.
        methods: full, lora or both.
        out: write the results as JSON here (docs/benchmarks/finetune.json; benchmarks/render.py shows it).
        child: internal: measure one configuration in this process and print JSON.
    """
    if child:
        job = child if isinstance(child, dict) else json.loads(child)  # fire may have parsed it already
        print(json.dumps(measure(job["impl"], job["method"], job["work"], job["cfg"])))
        return
    cfg = {"seq_len": seq_len, "batch": batch, "steps": steps, "rank": rank, "ac": bool(activation_checkpointing), "bf16": bool(bf16)}
    methods_ = [m for m in cli.split_list(methods)]
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        prepare(work, layers)
        runs = {(i, m): [] for m in methods_ for i in IMPLS}
        for r in range(repeats):
            for m in methods_:
                for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                    res = run_child(impl, m, work, cfg)
                    print(f"{impl:4} {m:4}: {res['tokens_per_s']:.1f} tokens/s, {res['tokens_per_cpu_s']:.2f} tokens/CPU-s, "
                          f"peak RSS {res['peak_rss_gib']:.2f} GiB")
                    runs[(impl, m)].append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows, results = [], {"shape": dict(SHAPE_1B, n_layers=layers), **cfg, "repeats": repeats, "runs": {}}
    for m in methods_:
        best = {i: max(x["tokens_per_s"] for x in runs[(i, m)]) for i in IMPLS}
        cpu = {i: max(x["tokens_per_cpu_s"] for x in runs[(i, m)]) for i in IMPLS}
        peak = {i: max(x["peak_rss_gib"] for x in runs[(i, m)]) for i in IMPLS}
        results["runs"][m] = {i: {"tokens_per_s": best[i], "tokens_per_cpu_s": cpu[i], "peak_rss_gib": peak[i],
                                  "all": runs[(i, m)]} for i in IMPLS}
        rows.append({"metric": f"SFT {m}{f' (LoRA rank {rank})' if m == 'lora' else ''}", "ours tokens/s": best["ours"],
                     "TRL tokens/s": best["trl"], "speed ours / TRL": best["ours"] / best["trl"],
                     "CPU time TRL / ours": cpu["ours"] / cpu["trl"],
                     "ours peak RSS GiB": peak["ours"], "TRL peak RSS GiB": peak["trl"],
                     "memory ours / TRL": peak["ours"] / peak["trl"]})
    precision = "bfloat16 autocast" if bf16 else "float32"
    headline = [{"metric": f"fine-tuning {r['metric']}, {layers}-layer 1B shape, CPU, {precision}: tokens/s ours / TRL SFTTrainer",
                 "value": round(r["speed ours / TRL"], 2)} for r in rows]
    write_json(out, envelope("finetune", results, rows, headline))


if __name__ == "__main__":
    cli.run(main, name="bench_finetune.py")
