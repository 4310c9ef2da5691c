"""Worker for the checkpoint tests: load each checkpoint with llama.weights.loader.load_model on this
process group's model-parallel size, run a forward pass and a few greedy decode steps, and save the
logits and tokens from rank 0 (torch.save of {ckpt_dir: {"logits", "tokens", "slices"}})."""
import fire
import torch

from llama import distributed
from llama.weights import checkpoint, loader
from llama.model import ModelArgs, Transformer

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119]
STEPS = 6


def greedy(model: Transformer, prompt: list, steps: int = STEPS) -> tuple[torch.Tensor, list]:
    """Logits of the prompt (1, len, vocab) and `steps` greedy tokens decoded one at a time."""
    device = model.tok_embeddings.weight.device
    model.free_cache()
    logits = model.forward(torch.tensor([prompt], device=device), 0)
    tokens = [int(logits[0, -1].argmax())]
    for i in range(steps - 1):
        step = model.forward(torch.tensor([[tokens[-1]]], device=device), len(prompt) + i)
        tokens.append(int(step[0, -1].argmax()))
    model.free_cache()
    return logits.cpu(), tokens


def main(ckpt_dirs, out: str) -> None:
    """ckpt_dirs: comma-separated checkpoint directories, all loaded in this one process group."""
    distributed.setup(torch.device("cpu"))
    results = {}
    for ckpt_dir in ckpt_dirs if isinstance(ckpt_dirs, (list, tuple)) else ckpt_dirs.split(","):
        params = checkpoint.read_params(ckpt_dir)
        args = ModelArgs(**params, max_seq_len=32, max_batch_size=1)
        model = loader.load_model(
            ckpt_dir, args, distributed.model_parallel_rank(), distributed.model_parallel_size(),
            torch.device("cpu"), torch.float32,
        )
        logits, tokens = greedy(model, PROMPT)
        results[ckpt_dir] = {"logits": logits, "tokens": tokens, "mp_size": distributed.model_parallel_size()}
    if distributed.is_rank0():
        torch.save(results, out)
    distributed.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
