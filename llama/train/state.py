"""What a fine-tuning run writes: its resumable state, its metrics log and its results, each
directory through the atomic writer, so a run killed at any moment leaves every one whole or as it
was. State dicts go through torch.distributed.checkpoint's state-dict utilities, so the same code
saves a model on one process and one sharded by FSDP2 over many (full tensors, gathered on rank 0).

    OUT_DIR/state/state.pt     step, trainable weights (the adapter with LoRA), optimizer, RNG, settings
    OUT_DIR/metrics.jsonl      one JSON object per logged step (appended; cut back to the state on resume)
    OUT_DIR/model/             the trained model as a Meta checkpoint (adapter merged) + tokenizer.model
    OUT_DIR/adapter/           with LoRA: the adapter alone (llama.weights.lora)
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llama import distributed
from llama.args import ModelArgs
from llama.atomic import atomic_output_dir, atomic_write_text
from llama.weights import lora
from llama.weights.save import save_checkpoint

logger = logging.getLogger(__name__)

STATE_DIR, STATE_FILE, METRICS_FILE = "state", "state.pt", "metrics.jsonl"
# settings a resumed run may change: they do not change what it computes
FREE_ON_RESUME = ("resume", "save_every", "eval_every", "eval_data", "device", "out_dir", "save_dtype")


def _options(trainable_only: bool, load: bool = False) -> StateDictOptions:
    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not trainable_only)
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)


def full_model_state(model: nn.Module, trainable_only: bool = False) -> dict:
    """The model's full (gathered) state dict on rank 0, on the CPU; collective: every rank calls it."""
    return get_model_state_dict(model, options=_options(trainable_only))


def save_state(out_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, settings: dict, trainable_only: bool) -> None:
    """The resumable state after `step` optimizer steps (collective; rank 0 writes)."""
    state = {
        "step": step,
        "model": full_model_state(model, trainable_only),
        "opt": get_optimizer_state_dict(model, opt, options=_options(trainable_only)),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "settings": settings,
    }
    if distributed.is_rank0():
        with atomic_output_dir(out_dir / STATE_DIR, overwrite=True) as tmp:
            torch.save(state, tmp / STATE_FILE)
        logger.info("step %d: state saved in %s", step, out_dir / STATE_DIR)
    if dist.is_initialized():
        dist.barrier()


def check_settings(saved: dict, settings: dict) -> None:
    """Refuse a resume whose settings would compute something else than the saved run's."""
    diff = [k for k in sorted(set(saved) | set(settings)) if k not in FREE_ON_RESUME and saved.get(k) != settings.get(k)]
    if diff:
        shown = ", ".join(f"--{k} {saved.get(k)!r} (now {settings.get(k)!r})" for k in diff)
        raise ValueError(f"--resume with other arguments than the saved run's: {shown}: pass the saved ones, or a new --out_dir")


def load_state(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, settings: dict, trainable_only: bool) -> int:
    """Load the saved state into model and optimizer (after checking the settings): its step; 0
    when there is none."""
    path = out_dir / STATE_DIR / STATE_FILE
    if not path.is_file():
        logger.info("--resume: no saved state in %s, starting at step 0", out_dir)
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_settings(state["settings"], settings)
    set_model_state_dict(model, state["model"], options=_options(trainable_only, load=True))
    set_optimizer_state_dict(model, opt, state["opt"], options=_options(trainable_only, load=True))
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def check_fresh(out_dir: Path) -> None:
    """A run that is not resuming must not mix its results with an earlier run's."""
    if (out_dir / STATE_DIR).exists() or (out_dir / METRICS_FILE).exists():
        raise ValueError(f"{out_dir} holds an earlier run: pass --resume to continue it, or a new --out_dir")


class MetricsLog:
    """OUT_DIR/metrics.jsonl on rank 0: appended line by line (flushed), and cut back to the
    resumed step so that the log of a resumed run reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, start_step: int):
        self.path = out_dir / METRICS_FILE
        if not distributed.is_rank0():
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a line cut by a kill, and anything after it
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if distributed.is_rank0():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def save_results(
    out_dir: Path, model: nn.Module, params: dict, ckpt_dir: str, tokenizer_path: str,
    save_dtype: torch.dtype, adapter: Optional[lora.LoRAConfig], base: Optional[Callable[[], dict]] = None,
) -> None:
    """The trained model as a Meta checkpoint in `save_dtype` (adapter merged) and, with LoRA, the
    adapter alone (collective; rank 0 writes). `base`: gives the weights the adapter is merged onto
    when the model's own are not full precision (a quantized base: its checkpoint read again)."""
    state = full_model_state(model)
    if distributed.is_rank0():
        if base is not None:
            state = {**base(), **{k: v for k, v in state.items() if ".lora." in k}}
        full = lora.merge(state, adapter.scale) if adapter is not None else state
        with atomic_output_dir(out_dir / "model", overwrite=True, inputs=[ckpt_dir]) as tmp:
            save_checkpoint(full, params, tmp, dtype=save_dtype)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        logger.info("wrote %s (params.json, consolidated.00.pth, tokenizer.model)", out_dir / "model")
        if adapter is not None:
            weights = {k: v for k, v in state.items() if ".lora." in k}
            lora.save_adapter(weights, adapter, ModelArgs(**params), out_dir / "adapter")
            logger.info("wrote %s (%s, %s)", out_dir / "adapter", lora.CONFIG_FILE, lora.WEIGHTS_FILE)
    if dist.is_initialized():
        dist.barrier()
