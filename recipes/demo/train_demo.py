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
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llama import ModelArgs, Tokenizer, Transformer, cli, distributed
from llama.runtime import probes
from llama.weights.checkpoint import read_params
from llama.weights.loader import load_model
from llama.weights.save import save_checkpoint
from llama.tokenizer import ChatFormat

REPO = Path(__file__).resolve().parent.parent

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


def encode_corpus(tokenizer: Tokenizer, text_path: Path) -> torch.Tensor:
    """Documents (separated by blank-line-free form feeds or double newlines as the corpus writes them)
    encoded as one stream: <|begin_of_text|> doc <|end_of_text|> ..."""
    text = text_path.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n\n") if d.strip()]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.strip(), bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.int32)


def encode_dialogs(tokenizer: Tokenizer, path: Path) -> torch.Tensor:
    """Dialogs in the Llama 3 chat format, each ending with the assistant's <|eot_id|>."""
    fmt = ChatFormat(tokenizer)
    ids: list[int] = []
    if not path.is_file():
        return torch.tensor(ids, dtype=torch.int32)
    for line in path.read_text(encoding="utf-8").splitlines():
        dialog = json.loads(line)["dialog"]
        ids += fmt.encode_dialog_prompt(dialog[:-1])
        ids += tokenizer.encode(dialog[-1]["content"].strip(), bos=False, eos=False) + [tokenizer.eot_id]
    return torch.tensor(ids, dtype=torch.int32)


def load_data(tokenizer: Tokenizer, data_dir: Path, cache: Path) -> dict:
    if cache.is_file():
        return torch.load(cache)
    data = {
        "train": encode_corpus(tokenizer, data_dir / "corpus_train.txt"),
        "heldout": encode_corpus(tokenizer, data_dir / "corpus_heldout.txt"),
        "chat_train": encode_dialogs(tokenizer, data_dir / "dialogs_train.jsonl"),
        "chat_heldout": encode_dialogs(tokenizer, data_dir / "dialogs_heldout.jsonl"),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch, seq_len + 1) token windows of `stream` beginning at `starts`."""
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


def batch_for_step(data: dict, step: int, batch_size: int, seq_len: int, chat_fraction: float, seed: int):
    """The batch of a step depends only on (seed, step): training resumes deterministically."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_chat = int(round(batch_size * chat_fraction)) if len(data["chat_train"]) > seq_len + 1 else 0
    parts = []
    for key, n in (("train", batch_size - n_chat), ("chat_train", n_chat)):
        if n:
            starts = torch.randint(0, len(data[key]) - seq_len - 1, (n,), generator=g)
            parts.append(windows(data[key], starts, seq_len))
    return torch.cat(parts)


def lr_at(step: int, max_steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


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
    if transfer_steps < 0:
        raise ValueError(f"--transfer_steps {transfer_steps} is negative: pass 0 (no transfer) or more")
    if keep not in ("best", "last"):
        raise ValueError(f"--keep {keep!r}: pass best or last")
    if transfer_steps and not init_from:
        raise ValueError("--transfer_steps fits a new attention to --init_from's: pass --init_from DIR too")
    torch.manual_seed(seed)
    dev = distributed.resolve_device(device)
    distributed.setup(dev)
    tokenizer = Tokenizer(tokenizer_path)
    work = Path(work_dir)
    data = load_data(tokenizer, Path(data_dir), work / "data.pt")
    shape = {**DEMO_PARAMS, **(params or {}), "vocab_size": tokenizer.n_words}
    args = ModelArgs(**shape, max_seq_len=seq_len, max_batch_size=batch_size)

    # bfloat16 autocast where the device's policy computes large products (as training's are) in
    # bfloat16; master weights stay float32
    use_bf16 = probes.policy_for(dev).prefill.dtype == torch.bfloat16

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    model = Transformer(args).to(dev)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    if init_from and not (work / "state.pt").is_file():
        print(f"warm start from {init_from}")
        source = load_trained(init_from, dev, seq_len)
        warm_start(model, source)
        if transfer_steps:
            transfer_attention(model, source, data, transfer_steps, batch_size, seq_len, chat_fraction, seed, transfer_lr)
            val = evaluate(model, data["heldout"], seq_len, batch_size, dev, autocast)
            print(f"after the transfer: held-out loss {val:.3f}  perplexity {math.exp(val):.1f}", flush=True)
        del source
    teacher = load_trained(distill_from, dev, seq_len).requires_grad_(False) if distill_from else None
    if teacher is not None:
        print(f"distilling from {distill_from}")
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, lr, weight_decay)
    params_json = {k: v for k, v in shape.items() if v is not None}
    state_path = work / "state.pt"
    step, best = resume(state_path, model, opt, dev)
    fwd = torch.compile(model.forward_train) if compile else model.forward_train
    print(
        f"{n_params / 1e6:.2f}M parameters, {len(data['train']) / 1e6:.2f}M train tokens, "
        f"{len(data['heldout']) / 1e6:.2f}M held-out tokens, {len(data['chat_train']) / 1e6:.2f}M chat tokens, "
        f"device {dev}, bf16 autocast {use_bf16}"
    )
    model.train()
    t0, tokens_done, log_loss, losses = time.perf_counter(), 0, 0.0, []
    while step < max_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_steps, warmup, lr, min_lr)
        batch = batch_for_step(data, step, batch_size, seq_len, chat_fraction, seed).to(dev)
        loss = step_loss(fwd, teacher, batch, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        tokens_done += batch[:, 1:].numel()
        losses.append(loss.item())
        log_loss += losses[-1]
        if step % 50 == 0 or step == max_steps:
            elapsed = time.perf_counter() - t0
            tps = tokens_done / elapsed
            eta = (max_steps - step) * batch_size * seq_len / tps
            print(
                f"step {step}/{max_steps}  loss {log_loss / 50:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{tps:,.0f} tok/s  eta {eta / 60:.1f} min",
                flush=True,
            )
            log_loss = 0.0
        if step % eval_every == 0 or step == max_steps:
            val = evaluate(model, data["heldout"], seq_len, batch_size, dev, autocast)
            print(f"step {step}  held-out loss {val:.3f}  perplexity {math.exp(val):.1f}", flush=True)
            if val < best or keep == "last":
                best = min(best, val)
                export(model, params_json, out_dir)
                print(f"  {'best so far' if val == best else 'last'}: wrote {out_dir}/params.json and consolidated.00.pth (bfloat16)")
        if step % save_every == 0 or step == max_steps:
            work.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best}
            torch.save(state, work / "state.tmp")
            (work / "state.tmp").replace(state_path)
    print(f"done: best held-out loss {best:.3f} (perplexity {math.exp(best):.1f}); {out_dir} holds the {keep} weights")
    distributed.shutdown()
    return {"losses": losses, "best_heldout": best}


def make_optimizer(model: Transformer, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on the weight matrices only, not the norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


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


def load_trained(ckpt_dir: str, device: torch.device, seq_len: int) -> Transformer:
    """A trained Meta checkpoint (any shard count, tied or not) in float32 on this process, through
    the package's one checkpoint loader: the teacher of --distill_from, the source of --init_from."""
    args = ModelArgs(**{**read_params(ckpt_dir), "max_seq_len": seq_len})
    return load_model(ckpt_dir, args, 0, 1, device, torch.float32)


def warm_start(model: Transformer, source: Transformer) -> None:
    """Copy from `source` every tensor with the same name and shape as the model's. Attention weights
    are copied only when the head split (n_heads, n_kv_heads) is the same too: otherwise their rows
    belong to other heads, with other RoPE frequencies, and are left at their random initialisation."""
    ours, theirs = model.params, source.params
    same_heads = (theirs.n_heads, theirs.n_kv_heads or theirs.n_heads) == (ours.n_heads, ours.n_kv_heads or ours.n_heads)
    src = source.state_dict()
    copied, fresh = 0, []
    with torch.no_grad():
        for name, p in model.state_dict().items():
            t = src.get(name)
            if t is not None and t.shape == p.shape and (same_heads or ".attention." not in name):
                p.copy_(t.to(p.dtype))
                copied += p.numel()
            else:
                fresh.append(name)
    total = sum(p.numel() for p in model.parameters())
    print(f"  {copied / 1e6:.2f}M of {total / 1e6:.2f}M parameters copied, "
          f"{len(fresh)} tensors initialised afresh ({', '.join(sorted({n.split('.')[-2] for n in fresh}))})")


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
