"""Per-token loss and perplexity of text files, with a sliding window; python or torchrun.

Each file is encoded after <|begin_of_text|>; windows of --max_seq_len tokens start every --stride
tokens and each scores only the tokens no earlier window scored, the convention of Hugging Face's
perplexity guide (https://huggingface.co/docs/transformers/perplexity): with --stride equal to
--max_seq_len a window's first token has no context inside it and is not scored. The loss is the
one transformers gives on the same text, window and stride (tests/test_perplexity.py); the guide's
own token count is one low per overlapping window, the mean here is over the tokens scored.

    python scripts/perplexity.py data/demo/corpus_heldout.txt                  # the demo model
    python scripts/perplexity.py a.txt b.txt --ckpt_dir ~/Meta-Llama-3.1-8B --max_seq_len 4096 --stride 2048
"""
import json
import math
import sys
from pathlib import Path
from typing import Optional


from llama import distributed
from llama.cli import run
from llama.launch import build_generator
from llama.eval.scoring import sliding_windows, windowed_nll


def main(
    *files: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 2048,
    stride: Optional[int] = None,
    batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    remeasure: bool = False,
    quantize: Optional[str] = None,
    output_path: Optional[str] = None,
):
    """Print each file's tokens, loss (mean negative log-likelihood per token, nats) and perplexity.

    Args:
        files: UTF-8 text files, each scored on its own.
        ckpt_dir, tokenizer_path: the model (default: the bundled demo model).
        max_seq_len: window length in tokens.
        stride: tokens between window starts (default: max_seq_len // 2); each window scores only
            its last tokens that no earlier window scored.
        batch_size: windows per forward pass.
        device, dtype: where and in what precision to run the model (logits are float32 in any case).
        remeasure: time this machine's kernels again instead of reading the choice an earlier run kept
            (also LLAMA_REMEASURE=1).
        quantize: int8 | int4 | fp8 weights, passed to Llama.build only when given.
        output_path: also write the numbers to this JSON file (rank 0).
    """
    if not files:
        raise ValueError("no files given: pass one or more text files, e.g. scripts/perplexity.py notes.txt")
    stride = max(1, max_seq_len // 2) if stride is None else stride
    sliding_windows(0, max_seq_len, stride)  # checks the stride before the model is loaded
    texts = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such file")
        texts.append(Path(f).read_text(encoding="utf-8"))
    build = {"quantize": quantize} if quantize is not None else {}
    llama = build_generator(
        ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=batch_size, device=device, dtype=dtype, remeasure=remeasure, **build
    )
    rank0 = distributed.is_rank0()
    report, all_nll, all_tokens = {"files": {}}, 0.0, 0
    for f, text in zip(files, texts):
        ids = llama.tokenizer.encode(text, bos=True, eos=False)
        if len(ids) < 2:
            raise ValueError(f"{f} is empty: there is no token to score")

        def progress(done: int, total: int, name: str = f) -> None:
            if rank0 and (done == total or done % max(1, total // 10) < batch_size):
                print(f"\r{name}: window {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

        nll, n = windowed_nll(llama.model, ids, max_seq_len, stride, batch_size, progress, llama.policy)
        all_nll, all_tokens = all_nll + nll, all_tokens + n
        report["files"][f] = {"tokens": n, "loss": nll / n, "perplexity": math.exp(nll / n)}
    report["total"] = {"tokens": all_tokens, "loss": all_nll / all_tokens, "perplexity": math.exp(all_nll / all_tokens)}
    report.update(max_seq_len=max_seq_len, stride=stride, dtype=str(llama.model.output.weight.dtype).removeprefix("torch."))
    if rank0:
        rows = list(report["files"].items()) + ([("total", report["total"])] if len(files) > 1 else [])
        width = max(len(name) for name, _ in rows)
        print(f"{'':{width}} {'tokens':>10} {'loss':>8} {'perplexity':>11}")
        for name, r in rows:
            print(f"{name:{width}} {r['tokens']:>10,} {r['loss']:8.4f} {r['perplexity']:11.3f}")
        if output_path:
            Path(output_path).write_text(json.dumps(report, indent=2) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    run(main)
