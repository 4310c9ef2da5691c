"""Log-likelihood of token continuations, several sequences per forward pass: what evaluation and
perplexity are built on (llama/eval/lm.py, scripts/perplexity.py)."""
from typing import Callable, Optional, Sequence

import torch

from llama.model import Transformer
from llama.runtime import compute as kernels  # kernels_for moves to the runner


@torch.inference_mode()
def score_batch(
    model: Transformer, batch: Sequence[tuple[Sequence[int], Sequence[int]]], policy: Optional[kernels.Policy] = None
) -> list[tuple[float, bool]]:
    """(context, continuation) token lists -> (log p(continuation | context), whether greedy decoding
    gives the continuation) per row, all rows in one forward pass from position 0 (no KV cache).

    Each row is context + continuation without its last token; the context must be non-empty (a
    <|begin_of_text|> at least) and the whole row fit in the model's max_seq_len. `policy`: the
    kernel policy the pass runs under (llama.runtime; `Llama.policy`).
    """
    rows = [list(ctx) + list(cont[:-1]) for ctx, cont in batch]
    width = max(len(r) for r in rows)
    device = model.tok_embeddings.weight.device
    # right-padded: causal attention never lets a real position see the padding after it
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    tokens = tokens.to(device)
    with kernels.kernels_for(tokens, policy):
        logits = model.forward_train(tokens)  # (bsz, width, vocab) float32
    out = []
    for i, ((_, cont), r) in enumerate(zip(batch, rows)):
        end = len(r)
        lp = torch.log_softmax(logits[i, end - len(cont) : end], dim=-1)  # (len(cont), vocab)
        target = torch.tensor(list(cont), dtype=torch.long, device=device)
        greedy = bool((lp.argmax(dim=-1) == target).all())
        out.append((float(lp.gather(1, target[:, None]).sum()), greedy))
    return out


def sliding_windows(n_tokens: int, max_seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window over n_tokens tokens, as in Hugging Face's
    perplexity guide: windows of max_seq_len tokens start every `stride` tokens, and each scores
    only the tokens no earlier window scored (token 0 has no context and is never scored)."""
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride {stride} must be between 1 and max_seq_len {max_seq_len}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, first, end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def windowed_nll(
    model: Transformer, ids: Sequence[int], max_seq_len: int, stride: int, batch_size: int,
    progress: Optional[Callable[[int, int], None]] = None, policy: Optional[kernels.Policy] = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of one token sequence under `model`, over the
    sliding_windows of max_seq_len tokens `stride` apart, batch_size windows per forward pass;
    progress(windows done, windows) after each batch; the model runs under `policy` (score_batch)."""
    windows = sliding_windows(len(ids), max_seq_len, stride)
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = [(ids[begin:first], ids[first:end]) for begin, first, end in windows[i : i + batch_size]]
        total -= sum(lp for lp, _ in score_batch(model, batch, policy))
        if progress is not None:
            progress(min(i + batch_size, len(windows)), len(windows))
    return total, sum(end - first for _, first, end in windows)
