"""`llama-finetune`: SFT or DPO of a Meta-format checkpoint, every weight or LoRA, on one process or
several (torchrun: FSDP2), writing a Meta checkpoint that Llama.build and every script load."""
import contextlib
import copy
import logging
import os
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama import cli, distributed
from llama.demo import resolve_paths
from llama.runtime.policy import dtype_name, parse_dtype
from llama.tokenizer import Tokenizer
from llama.train import data as dataio
from llama.train import loop, qlora, state
from llama.train.optim import autocast_for, make_optimizer
from llama.weights import lora
from llama.weights.checkpoint import read_params
from llama.weights.loader import model_args, load_model
from llama.weights.quant_formats import resolve

logger = logging.getLogger(__name__)


def finetune(
    data: Optional[str] = None,
    out_dir: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    eval_data: Optional[str] = None,
    method: str = "sft",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: Union[str, tuple] = "wq,wk,wv,wo",
    rslora: bool = False,
    base_quantize: Optional[str] = None,
    max_steps: int = 100,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 2e-5,
    min_lr: float = 0.0,
    warmup: int = 10,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    max_seq_len: int = 2048,
    packing: bool = True,
    drop_long: bool = True,
    activation_checkpointing: bool = False,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    beta: float = 0.1,
    save_every: int = 0,
    eval_every: int = 0,
    resume: bool = False,
    save_dtype: Optional[str] = None,
) -> dict:
    """Fine-tune a Meta-format Llama 3 checkpoint (docs/finetuning.md). Returns the last step's metrics.

    Writes OUT_DIR/model/ (params.json, consolidated.00.pth, tokenizer.model: the trained model,
    LoRA merged), with LoRA OUT_DIR/adapter/ (the adapter alone, for Llama.build(adapter=...) and
    --adapter), OUT_DIR/metrics.jsonl and the resumable OUT_DIR/state/.

    Args:
        data: training data, JSON Lines: {"messages": [...]} or {"text": ...} (SFT), or
            {"prompt": [...], "chosen": [...], "rejected": [...]} (DPO).
        out_dir: the run's directory (new, or the same with --resume).
        ckpt_dir: the Meta checkpoint to start from (default: the bundled demo model).
        tokenizer_path: its tokenizer.model (default: CKPT_DIR/tokenizer.model, or the demo's).
        eval_data: held-out data in the same format: its loss (DPO: reward accuracy) every --eval_every steps.
        method: sft or dpo.
        lora_rank: 0 trains every weight; R > 0 trains rank-R adapters only (LoRA).
        lora_alpha: LoRA scale numerator (scale alpha / rank, or alpha / sqrt(rank) with --rslora).
        lora_dropout: dropout on the adapters' inputs while training.
        lora_targets: the projections given adapters, comma-separated: wq, wk, wv, wo, w1, w2, w3, output.
        rslora: rank-stabilised scaling alpha / sqrt(rank).
        base_quantize: int4 or int8: LoRA over the base quantized on load and frozen (QLoRA-style,
            llama.train.qlora); the merged model is written from the full-precision checkpoint.
        max_steps: optimizer steps.
        batch_size: the global batch: rows (SFT) or preference pairs (DPO) per optimizer step, split
            over the processes and the --grad_accum micro-batches.
        grad_accum: micro-batches per optimizer step on each process.
        lr: peak learning rate; min_lr: the end of the cosine decay; warmup: linear warm-up steps.
        weight_decay: AdamW weight decay on matrices (not norms).
        max_grad_norm: gradient clipping norm.
        seed: makes the data order, adapter initialisation and dropout reproducible.
        max_seq_len: model inputs per row; longer samples are dropped and counted (or refused, --drop_long False).
        packing: SFT: several samples per row, each attending only to itself; False: one sample a row, padded.
        drop_long: drop samples longer than --max_seq_len (True) or refuse the file (False).
        activation_checkpointing: recompute each block's activations in the backward pass (less memory).
        device: cuda or cpu (default: cuda when available).
        dtype: the weights' dtype (float32, bfloat16) with no autocast; default: float32 weights with
            bfloat16 autocast where the device's kernel policy computes in bfloat16.
        beta: DPO's temperature.
        save_every: save the resumable state every N steps (0: at the end only; always on SIGTERM).
        eval_every: held-out evaluation every N steps (0: never; needs --eval_data).
        resume: continue the run saved in OUT_DIR (the same arguments; the result is the uninterrupted run's).
        save_dtype: dtype of the written checkpoint (default: the training dtype).
    """
    settings = check_settings(dict(locals()))
    out = Path(settings["out_dir"])
    dev = distributed.resolve_device(device)
    distributed.setup(dev, model_parallel_size=1)
    world = dist.get_world_size()
    loop.check_batch(batch_size, grad_accum, world)
    if not resume and distributed.is_rank0():
        state.check_fresh(out)
    torch.manual_seed(seed)
    ckpt, tok_path = resolve_paths(ckpt_dir, tokenizer_path)
    qlora.check(base_quantize, lora_rank, dev, ckpt)
    tokenizer = Tokenizer(tok_path)
    items, eval_items = load_data(settings, tokenizer)
    weights_dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    autocast, use_bf16 = autocast_for(dev) if dtype is None else (contextlib.nullcontext, False)
    if distributed.is_rank0():
        logger.info("%d process(es) on %s: %s weights, bfloat16 autocast %s", world, dev, dtype_name(weights_dtype), "on" if use_bf16 else "off")
    # the frozen base kept in autocast's dtype (one process: FSDP2 shards a block's tensors together)
    compact = torch.bfloat16 if use_bf16 and world == 1 else None
    model, adapter = build_model(ckpt, settings, dev, weights_dtype, compact)
    frozen = copy.deepcopy(model).requires_grad_(False) if method == "dpo" and adapter is None else None
    if world > 1:
        shard(model)
        if frozen is not None:
            shard(frozen)
    opt = make_optimizer(model, lr, weight_decay)
    step = state.load_state(out, model, opt, settings, adapter is not None) if resume else 0
    reference = loop.Reference(model, frozen, autocast) if method == "dpo" else None
    run = loop.Loop(model, opt, items, eval_items, settings, out, dev, autocast, adapter is not None, reference)
    last = run.run(step)
    if run.stop_asked:
        return last
    out_dtype = parse_dtype(save_dtype) if save_dtype else weights_dtype
    restore_frozen_base(model, weights_dtype)
    # a quantized base: the adapter is merged onto the full-precision base on disk (llama.train.qlora)
    base = partial(full_precision_state, ckpt, settings, out_dtype) if base_quantize else None
    state.save_results(out, model, read_params(ckpt), ckpt, tok_path, out_dtype, adapter, base)
    return last


def check_settings(settings: dict) -> dict:
    """The flags checked before anything is loaded; `data` and `out_dir` as the command line names them."""
    if settings["data"] is None or settings["out_dir"] is None:
        raise ValueError("pass --data FILE.jsonl and --out_dir DIR")
    if settings["method"] not in ("sft", "dpo"):
        raise ValueError(f"--method {settings['method']!r}: pass sft or dpo")
    if settings["lora_rank"] < 0:
        raise ValueError(f"--lora_rank {settings['lora_rank']}: pass 0 (every weight trains) or a positive rank")
    qlora.check(settings["base_quantize"], settings["lora_rank"], distributed.resolve_device(settings["device"]))
    settings["lora_targets"] = list(lora.parse_targets(cli.split_list(settings["lora_targets"])))
    for key in ("dtype", "save_dtype"):
        if settings[key] is not None:
            settings[key] = dtype_name(parse_dtype(settings[key]))
    if settings["eval_every"] and not settings["eval_data"]:
        raise ValueError("--eval_every needs --eval_data FILE.jsonl")
    return settings


def load_data(settings: dict, tokenizer: Tokenizer) -> tuple[list, list]:
    """Training and held-out items: SFT rows (packed or one sample each) or DPO pairs."""
    out = []
    for path in (settings["data"], settings["eval_data"]):
        if path is None:
            out.append([])
            continue
        samples, dropped = dataio.load_samples(path, tokenizer, settings["method"], settings["max_seq_len"], settings["drop_long"])
        if dropped and distributed.is_rank0():
            logger.info("%s: %d sample(s) longer than --max_seq_len %d dropped", path, dropped, settings["max_seq_len"])
        if settings["method"] == "sft":
            samples = dataio.make_rows(samples, settings["max_seq_len"], settings["packing"], settings["seed"])
        out.append(samples)
    if distributed.is_rank0():
        logger.info("%d training %s, %d held-out", len(out[0]), "pairs" if settings["method"] == "dpo" else "rows", len(out[1]))
    return out[0], out[1]


def build_model(ckpt: str, settings: dict, dev: torch.device, dtype: torch.dtype,
                compact: Optional[torch.dtype] = None) -> tuple[nn.Module, Optional[lora.LoRAConfig]]:
    """The checkpoint loaded whole on this process (the one loader), with LoRA adapters attached and
    the base frozen when --lora_rank > 0, and activation checkpointing when asked. `compact`: the
    dtype of the autocast every forward pass will run under (compact_frozen_base), or None."""
    args = model_args(read_params(ckpt), settings["max_seq_len"], 1)
    quant = resolve(settings["base_quantize"])
    # a forced --dtype runs the quantized products in it too; else each takes the measured kernel's
    compute = dtype if quant is not None and settings["dtype"] is not None else None
    model = load_model(ckpt, args, 0, 1, dev, dtype, quant, compute)
    if quant is not None:
        qlora.make_trainable(model)
    if not settings["lora_rank"]:  # the loader may hand out memory-mapped tensors; training writes in place
        for p in model.parameters():  # (a frozen base is only read: a copy would double the load's peak)
            p.data = p.data.clone()
    adapter = None
    if settings["lora_rank"]:
        model.requires_grad_(False)
        adapter = lora.LoRAConfig(settings["lora_rank"], settings["lora_alpha"], tuple(settings["lora_targets"]),
                                  settings["lora_dropout"], settings["rslora"])
        lora.attach(model, adapter)
        if compact is not None and quant is None:
            compact_frozen_base(model, compact)
    if settings["activation_checkpointing"]:
        for block in model.layers:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if distributed.is_rank0():
        logger.info("%s: %s parameters train of %s", ckpt, f"{n_train:,}", f"{sum(p.numel() for p in model.parameters()):,}")
    return model.train(), adapter


def compact_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep each frozen block projection's weight in `dtype`, the dtype of the autocast that every
    product reading it runs under, where that loses nothing (a bfloat16 checkpoint's values):
    autocast converted it for every product, forward and gradient, and kept the converted copy for
    the backward pass, so the products are the same, bit for bit, without the conversions or the
    copies. (The output projection is left as it is: a tied one is the embedding, read outside
    autocast, and the fused loss converts a frozen one once and keeps it.) restore_frozen_base undoes it before
    the weights are merged and saved. The number of weights converted."""
    n = 0
    for _, proj in lora.projections(model, tuple(lora.BLOCK_TARGETS)):
        w = proj.weight
        if w.requires_grad or w.dtype == dtype or w.dtype not in lora.FLOAT_DTYPES:
            continue
        low = w.detach().to(dtype)
        if torch.equal(low.to(w.dtype), w):
            w.data, n = low, n + 1
    if distributed.is_rank0():
        logger.info("frozen base: %d projection weights kept in %s (autocast's dtype)", n, dtype_name(dtype))
    return n


def restore_frozen_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Bring the weights compact_frozen_base converted back to the training dtype (exactly)."""
    for _, proj in lora.projections(model, tuple(lora.BLOCK_TARGETS)):
        w = proj.weight
        if not w.requires_grad and w.dtype != dtype and w.dtype in lora.FLOAT_DTYPES:
            w.data = w.data.to(dtype)


def full_precision_state(ckpt: str, settings: dict, dtype: torch.dtype) -> dict:
    """The base checkpoint's weights as stored (full precision), in `dtype`, on the CPU."""
    args = model_args(read_params(ckpt), settings["max_seq_len"], 1)
    return load_model(ckpt, args, 0, 1, torch.device("cpu"), dtype).state_dict()


def shard(model: nn.Module) -> None:
    """FSDP2 over every process: each block its own unit, then the rest (embedding, norm, output)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "forward_train")  # training calls it, not forward


def main() -> None:
    """The llama-finetune command."""
    if distributed.rank_from_env() == 0:
        cli.log_to_stdout("llama.train", "llama.weights")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    cli.run(finetune, name="llama-finetune")
