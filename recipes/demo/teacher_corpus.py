"""Write a model's own continuations of corpus prefixes as a training corpus (for a draft model).

A draft model is judged by how often it proposes what its model would emit, on the model's own
outputs. Distilling it on text the model wrote (the "on-policy" data of DistillSpec, Zhou et al.
2023) trains it on those outputs rather than only on the corpus. This script takes prefixes at
random places of `data_dir`'s training corpus (never its held-out split), lets the model continue
each, greedily or by sampling, and writes `out_dir` in `recipes/demo/demo_corpus.py`'s layout: the
continuations (each after its prefix) and, with `keep_corpus`, the original corpus in
corpus_train.txt; the held-out split and the dialogs copied unchanged. Then:

    python recipes/demo/teacher_corpus.py --out_dir data/demo_teacher
    python recipes/demo/train_demo.py --data_dir data/demo_teacher --distill_from llama/demo ...
"""
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from demo_corpus import DOC_SEPARATOR, read_documents
from llama import Tokenizer, cli, launch


def corpus_prefixes(tokenizer: Tokenizer, docs: list[str], n: int, shortest: int, longest: int, seed: int) -> list[list[int]]:
    """`n` prompts: <|begin_of_text|> and a run of shortest..longest tokens from a random place of the
    documents' token stream; fixed by `seed`."""
    stream = torch.tensor([t for d in docs for t in tokenizer.encode(d, bos=False, eos=False)])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - longest, (n,), generator=g).tolist()
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    return [[tokenizer.bos_id] + stream[s : s + k].tolist() for s, k in zip(starts, lengths)]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    data_dir: str = "data/demo",
    out_dir: str = "data/demo_teacher",
    n_prompts: int = 6144,
    prompt_len: tuple = (8, 64),
    new_tokens: int = 192,
    temperatures: tuple = (0.0, 0.8),
    top_p: float = 0.95,
    batch_size: int = 64,
    keep_corpus: bool = True,
    seed: int = 7,
    dtype: Optional[str] = None,
):
    """Continue `n_prompts` corpus prefixes with the model at `ckpt_dir` and write a corpus of them.

    Args:
        ckpt_dir: the model whose outputs the draft should learn (default: the bundled demo model).
        tokenizer_path: its tokenizer (default: ckpt_dir/tokenizer.model).
        data_dir: recipes/demo/demo_corpus.py's output: prefixes come from corpus_train.txt.
        out_dir: where corpus_{train,heldout}.txt and dialogs_{train,heldout}.jsonl are written.
        n_prompts: continuations written.
        prompt_len: (shortest, longest) prefix in tokens, drawn uniformly.
        new_tokens: tokens generated after each prefix (fewer where the model ends its text).
        temperatures: prompts are split evenly over these (0 is greedy decoding).
        top_p: nucleus sampling for temperatures above 0.
        batch_size: prompts generated together.
        keep_corpus: also keep the original training corpus in corpus_train.txt.
        seed: fixes the prefixes and the sampling.
        dtype: the model's dtype (default: the measured policy).
    """
    data, out = Path(data_dir), Path(out_dir)
    src = data / "corpus_train.txt"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run python recipes/demo/demo_corpus.py --out_dir {data_dir} first")
    lo, hi = (int(x) for x in prompt_len)
    llama = launch.build_generator(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=hi + new_tokens + 1,
        max_batch_size=batch_size,
        seed=seed,
        dtype=dtype,
    )
    tok = llama.tokenizer
    docs = read_documents(src)
    prompts = corpus_prefixes(tok, docs, n_prompts, lo, hi, seed)
    written, t0 = [], time.perf_counter()
    per_temp = -(-n_prompts // len(temperatures))
    for i in range(0, n_prompts, batch_size):
        batch = prompts[i : i + batch_size]
        temperature = float(temperatures[min(i // per_temp, len(temperatures) - 1)])
        tokens, _ = llama.generate(batch, new_tokens, temperature=temperature, top_p=top_p, echo=True, seed=seed + i)
        written += [tok.decode([t for t in seq if t != tok.bos_id]) for seq in tokens]
        done = min(i + batch_size, n_prompts)
        print(f"{done}/{n_prompts} continuations, {time.perf_counter() - t0:.0f} s", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    # documents never hold two blank lines in a row (DOC_SEPARATOR): a continuation's are closed up
    written = [re.sub(r"\n{3,}", "\n\n", w.strip()) for w in written]
    docs = docs if keep_corpus else []
    parts = docs + [w for w in written if w]
    (out / "corpus_train.txt").write_text(DOC_SEPARATOR.join(parts) + "\n", encoding="utf-8")
    for name in ("corpus_heldout.txt", "dialogs_train.jsonl", "dialogs_heldout.jsonl"):
        if (data / name).is_file():
            shutil.copyfile(data / name, out / name)
    print(f"wrote {out}/corpus_train.txt: {len(written)} continuations" + (f" after {len(docs)} corpus documents" if docs else ""))


if __name__ == "__main__":
    cli.run(main)
