"""Held-out perplexity of the demo model beside unigram and bigram baselines on the same text.

All three are scored per token of the demo tokenizer on the held-out split that training never
saw; the baselines are estimated on the training split (add-one unigram; bigram interpolated
with the unigram, its weight chosen on the held-out text itself, which only flatters the baseline).

    python recipes/demo/evaluate_demo.py                       # the bundled model on data/demo
    python recipes/demo/evaluate_demo.py --max_tokens 20000    # a quicker estimate
"""
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llama import Llama, distributed
from llama.cli import run
from llama.engine.runner import call_model
from llama.launch import build_generator


def encode_docs(tokenizer, path: Path) -> list[int]:
    """The corpus as the training script sees it: <|begin_of_text|> doc <|end_of_text|> per document."""
    ids: list[int] = []
    for doc in path.read_text(encoding="utf-8").split("\n\n\n"):
        if doc.strip():
            ids += tokenizer.encode(doc.strip(), bos=True, eos=True)
    return ids


@torch.inference_mode()
def model_nll(llama: Llama, ids: list[int], seq_len: int) -> float:
    """Mean next-token negative log-likelihood over consecutive windows of `seq_len` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor([ids[start : start + seq_len + 1]], device=llama.device)
        if window.shape[1] < 2:
            break
        llama.model.free_cache()
        logits = call_model(llama.model, llama.policy, window[:, :-1], 0)
        total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    llama.model.free_cache()
    return total / count


def ngram_nll(train: list[int], heldout: list[int], vocab: int) -> tuple[float, float]:
    """Mean NLL of an add-one unigram and of the best interpolated bigram on `heldout`."""
    uni = Counter(train)
    n = len(train)
    p_uni = {t: (uni[t] + 1) / (n + vocab) for t in set(heldout)}
    bigrams = Counter(zip(train, train[1:]))
    pairs = list(zip(heldout, heldout[1:]))
    unigram = -sum(math.log(p_uni[b]) for _, b in pairs) / len(pairs)
    best = math.inf
    for lam in (0.5, 0.6, 0.7, 0.8, 0.9):
        nll = 0.0
        for a, b in pairs:
            p_bi = bigrams[(a, b)] / uni[a] if uni[a] else 0.0
            nll -= math.log(lam * p_bi + (1 - lam) * p_uni[b])
        best = min(best, nll / len(pairs))
    return unigram, best


def main(
    data_dir: str = "data/demo",
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_tokens: Optional[int] = None,
    seq_len: int = 512,
    device: Optional[str] = None,
    dtype: str = "float32",
    quantize: Optional[str] = None,
    group_size: int = 32,
):
    """Print held-out perplexities: model, unigram and bigram baselines.

    Args:
        data_dir: corpus_train.txt and corpus_heldout.txt from recipes/demo/demo_corpus.py.
        ckpt_dir, tokenizer_path: the model (default: the bundled demo model).
        max_tokens: score only the first max_tokens held-out tokens.
        seq_len: context window for the model (its training length is 512).
        device, dtype: where and in what precision to run the model.
        quantize: int8, int4 (or fp8 on CUDA sm89+) weight-only quantization on load, or w8a8 (int8
            weights and activations, x86 CPUs); none by default;
            a checkpoint from scripts/quantize.py loads quantized as stored.
        group_size: int4 group size (32, 64, 128, 256).
    """
    llama = build_generator(ckpt_dir, tokenizer_path, max_seq_len=seq_len, max_batch_size=1, device=device, dtype=dtype,
        quantize=quantize, group_size=group_size,
    )
    data = Path(data_dir)
    heldout = encode_docs(llama.tokenizer, data / "corpus_heldout.txt")[: max_tokens or None]
    train = encode_docs(llama.tokenizer, data / "corpus_train.txt")
    model = model_nll(llama, heldout, seq_len)
    unigram, bigram = ngram_nll(train, heldout, llama.tokenizer.n_words)
    print(f"held-out tokens: {len(heldout):,} (train tokens for the baselines: {len(train):,})")
    print(f"{'':10} {'loss':>7} {'perplexity':>11}")
    for name, nll in (("unigram", unigram), ("bigram", bigram), ("model", model)):
        print(f"{name:10} {nll:7.3f} {math.exp(nll):11.1f}")
    distributed.shutdown()


if __name__ == "__main__":
    run(main)
