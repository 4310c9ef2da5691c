"""Train the bundled demo model: a small Llama 3, from scratch, with this package's own Transformer.

The recipe of the LLaMA papers where it applies: AdamW (betas 0.9, 0.95, weight decay 0.1 on
matrices), linear warm-up then cosine decay to a tenth of the peak, gradient clipping at 1.0, and a
held-out split that is never trained on. Deterministic for a seed (batches are drawn from a
generator seeded by step), resumable from work_dir/state.pt, and the same script on CPU or CUDA.

    python recipes/demo/demo_corpus.py && python recipes/demo/train_tokenizer.py   # data and tokenizer first
    python recipes/demo/train_demo.py                                     # the shipped recipe, on the CPU
    python recipes/demo/train_demo.py --device cuda --max_steps 2000 --seq_len 512

The shipped 8-head model was made from an earlier 5-head one (the CUDA line above, with 5 query
heads and 1 KV head), with --init_from, --transfer_steps and a short
fine-tune: docs/demo-model.md has the commands.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llama import ModelArgs, Tokenizer, Transformer, cli, distributed
from llama.train.optim import autocast_for, lr_at, make_optimizer
from llama.weights.save import save_checkpoint
from train_data import batch_for_step, load_data, windows
from warm_start import load_trained, warm_start

# The shipped shape: grouped-query attention (8 query heads share 2 KV heads, so it shards on 1, 2
# and 4 processes), ~11.7M parameters. docs/demo-model.md says how it was made from the earlier 5-head demo.
DEMO_PARAMS = {
    "dim": 320,
    "n_layers": 8,
    "n_heads": 8,
    "n_kv_heads": 2,
    "multiple_of": 64,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


@torch.no_grad()
def evaluate(model: Transformer, stream: torch.Tensor, seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the whole stream."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows(stream, starts[i : i + batch_size], seq_len).to(device)
        with autocast():
            logits = model.forward_train(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / max(1, count)


def train(
    data_dir: str = "data/demo",
    tokenizer_path: str = "llama/demo/tokenizer.model",
    out_dir: str = "llama/demo",
    work_dir: str = "runs/demo",
    max_steps: int = 3000,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 2e-3,
    min_lr: float = 2e-4,
    warmup: int = 200,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    chat_fraction: float = 0.1,
    eval_every: int = 500,
    save_every: int = 250,
    seed: int = 1337,
    device: Optional[str] = None,
    compile: bool = False,
    params: Optional[dict] = None,
    init_from: Optional[str] = None,
    distill_from: Optional[str] = None,
    transfer_steps: int = 0,
    transfer_lr: float = 2e-3,
    keep: str = "best",
):
    """Train the demo model and write it as a Meta checkpoint (params.json, consolidated.00.pth).

    Returns the training losses of the steps run and the best held-out loss.

    Args:
        data_dir: corpus_{train,heldout}.txt and dialogs_{train,heldout}.jsonl from demo_corpus.py.
        tokenizer_path: tiktoken BPE file from train_tokenizer.py.
        out_dir: where the finished checkpoint (bfloat16) goes.
        work_dir: resumable training state and the encoded-data cache.
        max_steps: optimizer steps (batch_size * seq_len tokens each).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        lr: peak learning rate; min_lr: the floor of the cosine decay.
        warmup: linear warm-up steps.
        weight_decay: AdamW decay on weight matrices (not norms).
        grad_clip: gradient norm clip.
        chat_fraction: share of each batch drawn from the chat dialogs.
        eval_every: held-out evaluation interval; save_every: resumable-state interval.
        seed: makes initialisation and batches reproducible.
        device: cuda or cpu (default: cuda when available).
        compile: torch.compile the model.
        params: model shape overrides (a dict of params.json keys), e.g. for a tiny test run.
        init_from: a Meta checkpoint directory to start from instead of random weights (see
            warm_start); with transfer_steps, how the 8-head demo was made from the 5-head one on a
            2-core CPU.
        distill_from: a trained Meta checkpoint of the same tokenizer to learn from: the loss is the
            KL divergence from its next-token distributions to the model's, not the cross-entropy
            with the corpus's next tokens (the held-out evaluation stays cross-entropy).
        transfer_steps: with init_from in another head split, first fit every block's attention to
            the source's for this many steps (see transfer_attention), then train as usual;
            transfer_lr: the peak learning rate of that fit.
        keep: "best" writes the weights of the best held-out loss (the corpus is small: those
            generalise best); "last" writes them at every evaluation, so the last step's are kept (a
            draft model is judged by its agreement with its model, which the corpus's loss does not
            measure).
    """
    check_options(transfer_steps, keep, init_from)
    dev, data, shape = set_up(seed, device, tokenizer_path, Path(data_dir), Path(work_dir), params)
    autocast, use_bf16 = autocast_for(dev)
    model = Transformer(ModelArgs(**shape, max_seq_len=seq_len, max_batch_size=batch_size)).to(dev)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    work = Path(work_dir)
    if init_from and not (work / "state.pt").is_file():
        start_from(init_from, model, data, dev, autocast, transfer_steps, transfer_lr, batch_size, seq_len,
                   chat_fraction, seed)
    teacher = load_trained(distill_from, dev, seq_len).requires_grad_(False) if distill_from else None
    if teacher is not None:
        print(f"distilling from {distill_from}")
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, lr, weight_decay)
    step, best = resume(work / "state.pt", model, opt, dev)
    print(
        f"{n_params / 1e6:.2f}M parameters, {len(data['train']) / 1e6:.2f}M train tokens, "
        f"{len(data['heldout']) / 1e6:.2f}M held-out tokens, {len(data['chat_train']) / 1e6:.2f}M chat tokens, "
        f"device {dev}, bf16 autocast {use_bf16}"
    )
    trainer = Trainer(
        model=model, opt=opt, fwd=torch.compile(model.forward_train) if compile else model.forward_train,
        teacher=teacher, data=data, device=dev, autocast=autocast, work=work, out_dir=out_dir, keep=keep,
        params_json={k: v for k, v in shape.items() if v is not None}, max_steps=max_steps, batch_size=batch_size,
        seq_len=seq_len, lr=lr, min_lr=min_lr, warmup=warmup, grad_clip=grad_clip, chat_fraction=chat_fraction,
        eval_every=eval_every, save_every=save_every, seed=seed,
    )
    losses, best = trainer.run(step, best)
    print(f"done: best held-out loss {best:.3f} (perplexity {math.exp(best):.1f}); {out_dir} holds the {keep} weights")
    distributed.shutdown()
    return {"losses": losses, "best_heldout": best}


def check_options(transfer_steps: int, keep: str, init_from: Optional[str]) -> None:
    """Refuse contradictory or unknown flags before any data is read or model built."""
    if transfer_steps < 0:
        raise ValueError(f"--transfer_steps {transfer_steps} is negative: pass 0 (no transfer) or more")
    if keep not in ("best", "last"):
        raise ValueError(f"--keep {keep!r}: pass best or last")
    if transfer_steps and not init_from:
        raise ValueError("--transfer_steps fits a new attention to --init_from's: pass --init_from DIR too")


def set_up(
    seed: int, device: Optional[str], tokenizer_path: str, data_dir: Path, work: Path, params: Optional[dict]
) -> tuple[torch.device, dict, dict]:
    """Seed this process, take the device (and the process group of one), encode the data (cached in
    `work`): (device, data, the model's shape: the demo's with `params` over it, the tokenizer's
    vocabulary)."""
    torch.manual_seed(seed)
    dev = distributed.resolve_device(device)
    distributed.setup(dev)
    tokenizer = Tokenizer(tokenizer_path)
    data = load_data(tokenizer, data_dir, work / "data.pt")
    return dev, data, {**DEMO_PARAMS, **(params or {}), "vocab_size": tokenizer.n_words}


def start_from(
    init_from: str, model: Transformer, data: dict, dev: torch.device, autocast: Callable[[], torch.autocast],
    transfer_steps: int, transfer_lr: float, batch_size: int, seq_len: int, chat_fraction: float, seed: int,
) -> None:
    """--init_from: the trained checkpoint's tensors where they fit (warm_start), then with
    transfer_steps the model's attention fitted to the checkpoint's (transfer_attention)."""
    print(f"warm start from {init_from}")
    source = load_trained(init_from, dev, seq_len)
    warm_start(model, source)
    if transfer_steps:
        transfer_attention(model, source, data, transfer_steps, batch_size, seq_len, chat_fraction, seed, transfer_lr)
        val = evaluate(model, data["heldout"], seq_len, batch_size, dev, autocast)
        print(f"after the transfer: held-out loss {val:.3f}  perplexity {math.exp(val):.1f}", flush=True)


@dataclass
class Trainer:
    """The training loop and what it works on: the model, its optimizer and forward (compiled or not),
    the teacher when distilling, the data, where it writes, and train's settings of the loop."""

    model: Transformer
    opt: torch.optim.Optimizer
    fwd: Callable[[torch.Tensor], torch.Tensor]
    teacher: Optional[Transformer]
    data: dict
    device: torch.device
    autocast: Callable[[], torch.autocast]
    work: Path
    out_dir: str
    keep: str
    params_json: dict
    max_steps: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr: float
    warmup: int
    grad_clip: float
    chat_fraction: float
    eval_every: int
    save_every: int
    seed: int

    def run(self, step: int, best: float) -> tuple[list[float], float]:
        """Train from `step` (0, or where the saved state stopped) to max_steps, logging every 50 steps,
        evaluating every eval_every and saving every save_every: (each step's loss, best held-out loss)."""
        self.model.train()
        t0, tokens_done, log_loss, losses = time.perf_counter(), 0, 0.0, []
        while step < self.max_steps:
            batch = batch_for_step(self.data, step, self.batch_size, self.seq_len, self.chat_fraction, self.seed)
            batch = batch.to(self.device)
            losses.append(self.train_step(step, batch))
            step += 1
            tokens_done += batch[:, 1:].numel()
            log_loss += losses[-1]
            if step % 50 == 0 or step == self.max_steps:
                self.log_progress(step, log_loss / 50, tokens_done / (time.perf_counter() - t0))
                log_loss = 0.0
            if step % self.eval_every == 0 or step == self.max_steps:
                best = self.evaluate_and_keep(step, best)
            if step % self.save_every == 0 or step == self.max_steps:
                self.save_state(step, best)
        return losses, best

    def train_step(self, step: int, batch: torch.Tensor) -> float:
        """One optimizer step on `batch` at the schedule's learning rate for `step`: the batch's loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.max_steps, self.warmup, self.lr, self.min_lr)
        loss = step_loss(self.fwd, self.teacher, batch, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        return loss.item()

    def log_progress(self, step: int, mean_loss: float, tokens_per_s: float) -> None:
        """The progress line: the loss over the last 50 steps, learning rate, speed and time left."""
        eta = (self.max_steps - step) * self.batch_size * self.seq_len / tokens_per_s
        print(
            f"step {step}/{self.max_steps}  loss {mean_loss:.3f}  lr {self.opt.param_groups[0]['lr']:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  eta {eta / 60:.1f} min",
            flush=True,
        )

    def evaluate_and_keep(self, step: int, best: float) -> float:
        """The held-out loss now; the weights written to out_dir when it is the best so far (or at every
        evaluation with keep="last"). Returns the best held-out loss."""
        val = evaluate(self.model, self.data["heldout"], self.seq_len, self.batch_size, self.device, self.autocast)
        print(f"step {step}  held-out loss {val:.3f}  perplexity {math.exp(val):.1f}", flush=True)
        if val < best or self.keep == "last":
            best = min(best, val)
            export(self.model, self.params_json, self.out_dir)
            kept = "best so far" if val == best else "last"
            print(f"  {kept}: wrote {self.out_dir}/params.json and consolidated.00.pth (bfloat16)")
        return best

    def save_state(self, step: int, best: float) -> None:
        """The resumable state (model, optimizer, step, best) for `resume`, written beside and then moved
        over the last one, so that a run killed while saving still has a whole state."""
        self.work.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": step, "best": best}
        torch.save(state, self.work / "state.tmp")
        (self.work / "state.tmp").replace(self.work / "state.pt")


def resume(state_path: Path, model: Transformer, opt: torch.optim.Optimizer, device: torch.device) -> tuple[int, float]:
    """(step, best held-out loss) of the saved training state, loaded into model and opt; (0, inf)
    when there is none."""
    if not state_path.is_file():
        return 0, float("inf")
    state = torch.load(state_path, map_location=device)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    print(f"resumed from {state_path} at step {state['step']}")
    return state["step"], state["best"]


def step_loss(fwd, teacher: Optional[Transformer], batch: torch.Tensor, autocast) -> torch.Tensor:
    """The loss of one batch: cross-entropy with the next tokens, or with a teacher the KL divergence
    from its next-token distributions to the model's."""
    with autocast():
        logits = fwd(batch[:, :-1])
    if teacher is None:
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    with torch.no_grad(), autocast():
        target = F.log_softmax(teacher.forward_train(batch[:, :-1]).float(), dim=-1).flatten(0, 1)
    student = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def transfer_attention(
    model: Transformer,
    source: Transformer,
    data: dict,
    steps: int,
    batch_size: int,
    seq_len: int,
    chat_fraction: float,
    seed: int,
    lr: float,
) -> list[float]:
    """Fit each block's attention, in the model's head split, to the source's attention: both see
    the source's own normalised hidden states, and the loss is each block's squared error relative
    to the power of the source's attention output. The blocks are independent problems, so this is
    far cheaper than training the whole model, and the copied norms and FFNs keep receiving inputs
    like the ones they were trained on. Returns each step's error summed over the blocks."""
    dev = next(model.parameters()).device
    rope_src, rope = source.rope_table(dev)[:seq_len], model.rope_table(dev)[:seq_len]
    params = [p for layer in model.layers for p in layer.attention.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    pairs = []  # (input, output) of each of the source's attentions, in block order, this step
    hooks = [b.attention.register_forward_hook(lambda _, args, out: pairs.append((args[0], out))) for b in source.layers]
    t0, totals = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, min(100, steps // 10), lr, lr / 10)
        tokens = batch_for_step(data, step, batch_size, seq_len, chat_fraction, seed + 1)[:, :-1].to(dev)
        pairs.clear()
        with torch.no_grad():  # the source's own blocks; its output layer is not needed
            h = source.tok_embeddings(tokens)
            for block in source.layers:
                h = block(h, 0, rope_src, None, use_cache=False)
        errors = torch.stack([
            (block.attention(x, 0, rope, None, use_cache=False) - y).pow(2).mean() / y.pow(2).mean()
            for block, (x, y) in zip(model.layers, pairs)
        ])
        opt.zero_grad(set_to_none=True)
        errors.sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        totals.append(errors.sum().item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            tps = (step + 1) * tokens.numel() / (time.perf_counter() - t0)
            per_block = " ".join(f"{e:.3f}" for e in errors.tolist())
            print(f"transfer {step + 1}/{steps}  relative error per block {per_block}  {tps:,.0f} tok/s", flush=True)
    for hook in hooks:
        hook.remove()
    return totals


def export(model: Transformer, params: dict, out_dir: str) -> None:
    """Write the model as a Meta checkpoint in bfloat16."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(state, params, out_dir, dtype=torch.bfloat16)


if __name__ == "__main__":
    cli.run(train)
