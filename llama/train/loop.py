"""The fine-tuning loop: each optimizer step's global batch split over the data-parallel processes
and into --grad_accum micro-batches, the loss normalised over the whole step (SFT: by the trained
tokens of every micro-batch on every process; DPO: by the pairs), clipping, the schedule, held-out
evaluation, progress, metrics and the resumable state.

Every process reads the whole data set and takes its slice of each step, so a step's batch depends
only on (seed, step) and the same global batch gives the same update on any process count.
FSDP2 averages gradients over the processes, so each one's loss is scaled by the process count.
"""
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from llama import distributed
from llama.train import data, losses, state
from llama.train.optim import lr_at
from llama.weights import lora

logger = logging.getLogger(__name__)


@dataclass
class Loop:
    """A run: the model (wrapped by FSDP2 or not), its optimizer, the encoded data (SFT rows or DPO
    pairs with their reference log-probs), and the settings that shape the loop."""

    model: nn.Module
    opt: torch.optim.Optimizer
    items: list
    eval_items: list
    settings: dict
    out_dir: Path
    device: torch.device
    autocast: Callable[[], torch.autocast]
    trainable_only: bool
    reference: Optional["Reference"] = None  # DPO's frozen reference
    stop_asked: bool = field(default=False, init=False)

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def run(self, step: int) -> dict:
        """Train from `step` to max_steps (or until SIGTERM, after which the state is saved and the
        run returns early): the last logged metrics."""
        s = self.settings
        metrics = state.MetricsLog(self.out_dir, step)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        last: dict = {}
        try:
            if s["eval_every"] and step == 0 and self.eval_items:
                last = {"step": 0, **self.evaluate()}
                metrics.write(last)
                self._log(last)
            t0, tokens, start = time.perf_counter(), 0, step
            while step < s["max_steps"]:
                record = self.train_step(step)
                step += 1
                tokens += record.pop("tokens")
                speed = tokens / max(time.perf_counter() - t0, 1e-9)
                eta = (s["max_steps"] - step) * (time.perf_counter() - t0) / (step - start)
                record.update(step=step, tokens_per_s=round(speed, 1), eta_s=round(eta, 1))
                if self.eval_items and s["eval_every"] and (step % s["eval_every"] == 0 or step == s["max_steps"]):
                    record.update(self.evaluate())
                last = record
                metrics.write(record)
                self._log(record)
                stop = self._agreed_stop()
                if stop or (s["save_every"] and step % s["save_every"] == 0) or step == s["max_steps"]:
                    state.save_state(self.out_dir, step, self.model, self.opt, s, self.trainable_only)
                if stop:
                    logger.info("SIGTERM: stopped after step %d; --resume continues", step)
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
        return last

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_asked = True

    def _agreed_stop(self) -> bool:
        """Whether any process was asked to stop (all stop at the same step)."""
        if self.world == 1:
            return self.stop_asked
        flag = torch.tensor([float(self.stop_asked)])
        dist.all_reduce(flag, group=distributed_cpu_group())
        return bool(flag.item())

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This process's share of a step's items, cut into grad_accum micro-batches."""
        per_rank = len(indices) // self.world
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        n = per_rank // self.settings["grad_accum"]
        return [mine[i : i + n] for i in range(0, per_rank, n)]

    def train_step(self, step: int) -> dict:
        """One optimizer step: {loss, lr, grad_norm, DPO's rewards, and tokens: the real (unpadded)
        input tokens of the whole step, every process's}."""
        s = self.settings
        lr = lr_at(step, s["max_steps"], s["warmup"], s["lr"], s["min_lr"])
        for group in self.opt.param_groups:
            group["lr"] = lr
        indices = data.step_indices(len(self.items), step, s["batch_size"], s["seed"])
        self.model.train()
        if s["method"] == "dpo":
            sums, tokens = self._dpo_step(indices)
        else:
            sums, tokens = self._sft_step(indices)
        grad_norm = nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], s["max_grad_norm"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        return {**sums, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens}

    def _sft_step(self, indices: list[int]) -> tuple[dict, int]:
        rows = [self.items[i] for i in indices]
        n_trained = sum(sum(t != data.IGNORE for t in r.targets) for r in rows)  # the whole step's, every process's
        total = torch.zeros(())
        for micro in self.micro_batches(indices):
            batch = data.collate([self.items[i] for i in micro], self.device)
            loss = self._loss_sum(batch) / n_trained
            (loss * self.world).backward()
            total += loss.detach().cpu()
        return {"loss": self._sum_over_processes(total)}, sum(len(r.inputs) for r in rows)

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        positions = batch["positions"] if self.settings["packing"] else None  # padded rows: plain causal attention
        head = losses.fusable_head(self.model)
        with self.autocast():
            if head is None:
                return losses.token_loss_sum(self.model.forward_train(batch["inputs"], positions), batch["targets"])
            with losses.final_hidden_states(self.model):
                hidden = self.model.forward_train(batch["inputs"], positions)
            return losses.fused_token_loss_sum(hidden, head, batch["targets"])

    def _dpo_step(self, indices: list[int]) -> tuple[dict, int]:
        n_pairs = len(indices)
        sums = {"loss": torch.zeros(()), "reward_accuracy": torch.zeros(()), "reward_margin": torch.zeros(()),
                "reward_chosen": torch.zeros(()), "reward_rejected": torch.zeros(())}
        for micro in self.micro_batches(indices):
            terms = self._dpo_terms([self.items[i] for i in micro])
            (terms["loss"].sum() / n_pairs * self.world).backward()
            for k, v in _dpo_summary(terms).items():
                sums[k] += v.detach().cpu() / n_pairs
        tokens = sum(c.n_inputs + r.n_inputs for c, r in (self.items[i] for i in indices))
        return {k: self._sum_over_processes(v) for k, v in sums.items()}, tokens

    def _dpo_terms(self, pairs: list) -> dict:
        batch = data.collate(data.preference_rows(pairs), self.device)
        with self.autocast():
            logits = self.model.forward_train(batch["inputs"])
        logps = losses.sequence_logprobs(logits, batch["targets"])
        ref = self.reference(batch)
        n = len(pairs)
        return losses.dpo_terms(logps[:n], logps[n:], ref[:n], ref[n:], self.settings["beta"])

    def _sum_over_processes(self, x: torch.Tensor) -> float:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, group=distributed_cpu_group())
        return float(x)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics over the whole eval set, split over the processes (SFT: eval_loss per
        trained token; DPO: eval_loss, eval_reward_accuracy, eval_reward_margin per pair)."""
        self.model.eval()
        n, per = len(self.eval_items), self._eval_rows()
        sums = torch.zeros(4)  # loss, count, accuracy, margin
        for start in range(0, n, per * self.world):
            chunk = list(range(start + self.rank * per, min(start + (self.rank + 1) * per, n)))
            chunk = chunk or [start]  # every process runs each pass (FSDP2 gathers weights in step); weight 0 below
            weight = 1.0 if start + self.rank * per < n else 0.0
            if self.settings["method"] == "dpo":
                terms = self._dpo_terms([self.eval_items[i] for i in chunk])
                summary = _dpo_summary(terms)
                sums += weight * torch.stack([summary["loss"], torch.tensor(float(len(chunk))),
                                              summary["reward_accuracy"], summary["reward_margin"]]).cpu()
            else:
                batch = data.collate([self.eval_items[i] for i in chunk], self.device)
                count = (batch["targets"] != data.IGNORE).sum()
                sums[:2] += weight * torch.stack([self._loss_sum(batch).cpu(), count.float().cpu()])
        if self.world > 1:
            dist.all_reduce(sums, group=distributed_cpu_group())
        self.model.train()
        if self.settings["method"] == "dpo":
            return {"eval_loss": float(sums[0] / sums[1]), "eval_reward_accuracy": float(sums[2] / sums[1]),
                    "eval_reward_margin": float(sums[3] / sums[1])}
        return {"eval_loss": float(sums[0] / sums[1])}

    def _eval_rows(self) -> int:
        return max(1, self.settings["batch_size"] // (self.world * self.settings["grad_accum"]))

    def _log(self, r: dict) -> None:
        if not distributed.is_rank0():
            return
        parts = [f"step {r['step']}/{self.settings['max_steps']}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("eta_s", "eta {:.0f} s"), ("eval_loss", "held-out loss {:.4f}"),
                         ("reward_accuracy", "reward acc {:.2f}"), ("reward_margin", "margin {:.3f}"),
                         ("eval_reward_accuracy", "held-out reward acc {:.2f}")):
            if key in r:
                parts.append(fmt.format(r[key]))
        logger.info("  ".join(parts))


def _dpo_summary(terms: dict) -> dict:
    """Sums over the pairs: loss, rewards, how many are ranked right, and the reward margins."""
    margin = terms["chosen"] - terms["rejected"]
    return {"loss": terms["loss"].sum(), "reward_accuracy": (margin > 0).float().sum(), "reward_margin": margin.sum(),
            "reward_chosen": terms["chosen"].sum(), "reward_rejected": terms["rejected"].sum()}


_cpu_group = None


def distributed_cpu_group():
    """A gloo group for the loop's small CPU reductions (the default group may be NCCL)."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _cpu_group


class Reference:
    """DPO's frozen reference: the summed completion log-probs of a batch's rows under the model as
    loaded: the model itself with its adapters switched off (LoRA: the base is frozen), or a frozen
    copy of it made before training (every weight trains). Computed with each batch, dropout off."""

    def __init__(self, model: nn.Module, frozen: Optional[nn.Module], autocast: Callable[[], torch.autocast]):
        self.model, self.frozen, self.autocast = model, frozen, autocast

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        model = self.frozen if self.frozen is not None else self.model
        was_training = model.training
        model.eval()
        with (lora.disabled(model) if self.frozen is None else contextlib.nullcontext()), self.autocast():
            logps = losses.sequence_logprobs(model.forward_train(batch["inputs"]), batch["targets"])
        model.train(was_training)
        return logps


def check_batch(batch_size: int, grad_accum: int, world: int) -> None:
    """The global batch must split evenly over the processes and micro-batches."""
    if batch_size % (grad_accum * world):
        raise ValueError(
            f"--batch_size {batch_size} does not split into --grad_accum {grad_accum} micro-batches on {world} "
            f"process(es): pass a multiple of {grad_accum * world}"
        )

