"""`llama-eval` (scripts/evaluate.py): evaluate a checkpoint with lm-evaluation-harness, python or torchrun."""
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

from llama import distributed
from llama.eval.harness import check_tokenizer, evaluate, prepare_tasks
from llama.eval.lm import LlamaLM
from llama.eval.tasks import SUITE


def _quiet_lm_eval() -> None:
    """No lm-eval logs or progress bars on this process. Under tensor parallelism every rank tells
    lm-eval it is rank 0 (each must run every request), so lm-eval would draw on all of them; its
    bars pass `disable=` themselves, hence the override of tqdm's own default."""
    import tqdm as tqdm_module

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    init = tqdm_module.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm_module.tqdm.__init__ = quiet_init


def cli(
    tasks: Union[str, Sequence[str]] = SUITE,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    include_path: Union[str, Sequence[str], None] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_seq_len: int = 2048,
    max_gen_toks: int = 256,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    remeasure: bool = False,
    quantize: Optional[str] = None,
    adapter: Optional[str] = None,
    output_path: Optional[str] = None,
    log_samples: bool = False,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
) -> None:
    """Evaluate a checkpoint with lm-evaluation-harness; print lm-eval's table (rank 0).

    Args:
        tasks: lm-eval task, group or tag names, comma-separated (default: the bundled suite,
            which needs no download).
        ckpt_dir, tokenizer_path: the Meta-format checkpoint (default: the bundled demo model).
        include_path: extra directories of task YAML files (the bundled suite is always included).
        num_fewshot: few-shot examples per request (default: each task's own).
        limit: evaluate only the first N documents of each task (a fraction if below 1).
        batch_size: sequences per forward pass.
        max_seq_len: the longest window in tokens (longer requests keep their last tokens).
        max_gen_toks: new tokens for generation tasks that do not set their own.
        device, dtype: where and in what precision to run (see Llama.build).
        remeasure: time this machine's kernels again instead of reading the choice an earlier run kept
            (also LLAMA_REMEASURE=1).
        quantize: int8 | int4 | fp8 weights, passed to Llama.build only when given.
        adapter: a LoRA adapter directory (llama-finetune's OUT_DIR/adapter), applied unmerged.
        output_path: directory (or .json file) for lm-eval's results file, and samples files with
            --log_samples, in lm-eval's own format.
        log_samples: also write every request, response and per-sample score.
        seed: sampling seed of generation tasks that sample.
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0: none).
    """
    import sys

    from lm_eval.utils import make_table

    from llama.launch import build_generator

    rank0 = distributed.rank_from_env() == 0
    if not rank0:
        _quiet_lm_eval()
    if output_path is not None and Path(output_path).is_file() and Path(output_path).suffix != ".json":
        raise ValueError(f"--output_path {output_path} is a file: pass a directory, or a .json file name")
    check_tokenizer(ckpt_dir, tokenizer_path)
    prepared = prepare_tasks(tasks, include_path)
    build = {"quantize": quantize} if quantize is not None else {}
    build.update({"adapter": adapter} if adapter is not None else {})
    llama = build_generator(
        ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=batch_size, device=device, dtype=dtype, remeasure=remeasure, **build
    )
    lm = LlamaLM(llama, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)
    results = evaluate(
        lm,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        output_path=output_path,
        model_name=ckpt_dir or "llama-demo",
        bootstrap_iters=bootstrap_iters,
        prepared=prepared,
    )
    if results is not None and rank0:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        sys.stdout.flush()
    distributed.shutdown()


def main() -> None:
    """Console entry point (llama-eval)."""
    from llama.cli import run

    run(cli)


if __name__ == "__main__":
    main()
