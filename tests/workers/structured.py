"""Worker for the structured-output test under torchrun: the bundled demo model answers chat prompts
held to JSON schemas (greedy, and sampled with a seed); rank 0 writes each answer's tokens to a file
(torch.save). `answers` is what tests/test_structured.py runs in its own process to compare."""
import sys

import torch

from llama import Llama, demo, distributed

PROMPTS = ["Describe a pet as JSON.", "Give me an order."]
SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog", "bird"]},
    "size": {"type": "integer", "minimum": 1, "maximum": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 2}},
    "required": ["kind", "size", "tags"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


def build(**kwargs) -> Llama:
    return Llama.build(str(demo.DEMO_DIR), str(demo.TOKENIZER_PATH), max_seq_len=384, max_batch_size=4, device="cpu",
                       dtype="float32", **kwargs)


def answers(llama: Llama) -> list:
    """Greedy and seeded sampled answers' tokens (the stop token left out), prompt by prompt."""
    prompts = [llama.formatter.encode_dialog_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy, _ = llama.generate(prompts, 48, temperature=0, response_format=FORMAT)
    sampled, _ = llama.generate(prompts, 48, temperature=1.0, top_p=0.95, seed=5, response_format=FORMAT)
    return greedy + sampled


if __name__ == "__main__":
    llama = build()
    out = answers(llama)
    if distributed.is_rank0():
        torch.save(out, sys.argv[1])
    distributed.shutdown()
