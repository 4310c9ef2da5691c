"""Seeded fuzzing: random mutations of params.json and of request arguments each end in a clean
TypeError/ValueError or a correct result, never another exception."""
import json
import math
import random

import pytest
import torch

import helpers
from llama import Llama, distributed
from llama.weights import checkpoint, loader
from llama.model import ModelArgs, Transformer

N_PARAMS = 300
N_REQUESTS = 300

WEIRD = ["320", "", [], [64], {}, None, True, False, 0, -1, -64, 0.5, 64.0, math.nan, math.inf, -math.inf, 10**12]


def mutate_params(rng: random.Random) -> dict:
    """TINY_PARAMS with 1-3 keys set to odd values, deleted, scaled or sign-flipped."""
    params = dict(helpers.TINY_PARAMS)
    keys = list(params) + ["multiple_of", "ffn_dim_multiplier", "use_scaled_rope", "rope_scale_factor",
                           "rope_low_freq_factor", "rope_high_freq_factor", "rope_theta", "norm_eps"]
    for _ in range(rng.randint(1, 3)):
        key, op = rng.choice(keys), rng.random()
        if op < 0.15:
            params.pop(key, None)
        elif op < 0.6:
            params[key] = rng.choice(WEIRD)
        elif op < 0.8 and isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            params[key] = type(params[key])(params[key] * rng.choice([-1, 0, 2, 0.5, 3]))
        else:
            params[key] = rng.choice([1, 2, 3, 4, 8, 16, 1e-6, 1.3, True])
    return params


@pytest.fixture(scope="module")
def cpu_group():
    distributed.setup(torch.device("cpu"))


def test_params_json_mutations_fail_cleanly_or_build_a_working_model(tmp_path, cpu_group, tiny_ckpt):
    """Each mutated params.json beside the tiny checkpoint's weights: read and checked, then loaded
    (a clean refusal when it no longer matches the weights) and, when small, built from scratch."""
    rng = random.Random(1234)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "consolidated.00.pth").symlink_to(tiny_ckpt / "consolidated.00.pth")
    outcomes = {"refused": 0, "refused by the loader": 0, "loaded": 0, "built": 0}
    for i in range(N_PARAMS):
        params = mutate_params(rng)
        (ckpt / "params.json").write_text(json.dumps(params))  # NaN and inf as JSON writes them
        try:
            args = ModelArgs(**checkpoint.read_params(ckpt), max_seq_len=16, max_batch_size=1)
            args.validate(1)
        except (TypeError, ValueError) as e:
            assert str(e) and "\n" not in str(e), (params, e)
            outcomes["refused"] += 1
            continue
        tokens = torch.randint(0, min(args.vocab_size, 512), (1, 5))
        try:
            model = loader.load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.float32)
        except ValueError as e:  # valid on its own, but not the shape of these weights
            assert "\n" not in str(e), (params, e)
            outcomes["refused by the loader"] += 1
        else:
            assert torch.isfinite(model(tokens, 0)).all(), params
            outcomes["loaded"] += 1
        n_weights = args.vocab_size * args.dim * 2 + args.n_layers * (4 * args.dim**2 + 3 * args.dim * args.ffn_hidden_dim)
        if n_weights <= 2_000_000:  # small enough to build with random weights and run
            torch.manual_seed(i)
            logits = Transformer(args)(tokens, 0)
            assert logits.shape == (1, 5, args.vocab_size), params
            outcomes["built"] += 1
    assert outcomes["refused"] > N_PARAMS // 3 and outcomes["loaded"] > 10 and outcomes["built"] > 10, outcomes
    print(f"params.json mutations ({N_PARAMS}): {outcomes}")


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=24, max_batch_size=2, device="cpu", dtype="float32")


ODD = [None, -1, 0, 1, 2, 0.5, 1.5, -0.1, math.nan, math.inf, "1", [1], True, 10**9, 3]


def mutate_request(rng: random.Random) -> tuple[str, dict]:
    method = rng.choice(["generate", "stream", "text_completion", "chat_completion"])
    kwargs = {"temperature": rng.choice([0, 0.7]), "top_p": 0.9, "max_gen_len": 3, "seed": 1}
    if method in ("generate", "stream"):
        kwargs["prompt_tokens"] = [[1, 72, 105], [1, 33]]
    elif method == "text_completion":
        kwargs["prompts"] = ["Hi", "there"]
    else:
        kwargs["dialogs"] = [[{"role": "user", "content": "Hi"}]]
    keys = list(kwargs) + ["logprobs"] + (["echo"] if method in ("generate", "text_completion") else [])
    for _ in range(1 if rng.random() < 0.7 else 2):
        key = rng.choice(keys)
        if key == "prompt_tokens":
            kwargs[key] = rng.choice([[], [[]], [[1, 2], "x"], [[-1]], [[512]], [[1.0]], [[True]], "abc",
                                      [[1] * 30], [[1, 2]] * 3, [(1, 2)], ((5, 6),), [[511, 0]]])
        elif key == "prompts":
            kwargs[key] = rng.choice(["abc", [], [3], ["a", None], ["x" * 40], ["", "b"], ("ok",)])
        elif key == "dialogs":
            kwargs[key] = rng.choice([
                [{"role": "user", "content": "Hi"}], [[]], [[{"role": "bot", "content": "x"}]],
                [[{"role": "user", "content": 1}]], [[{"content": "x"}]], "Hi", [["Hi"]],
                [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
            ])
        else:
            kwargs[key] = rng.choice(ODD)
    return method, kwargs


def check_result(llama: Llama, method: str, kwargs: dict, result) -> None:
    """A valid request's result has the promised shape: one entry per prompt, ids in the vocabulary,
    at most max_gen_len new tokens, log-probs when asked."""
    limit = llama.model.params.max_seq_len if kwargs["max_gen_len"] is None else kwargs["max_gen_len"]
    if method == "generate":
        tokens, lps = result
        assert len(tokens) == len(kwargs["prompt_tokens"])
        for prompt, t in zip(kwargs["prompt_tokens"], tokens):
            new = t[len(prompt):] if kwargs.get("echo") else t
            assert len(new) <= limit and all(0 <= x < llama.model.params.vocab_size for x in t)
        assert (lps is not None) == kwargs.get("logprobs", False)
    elif method == "stream":
        rows = [tok.index for step in result for tok in step]
        assert all(0 <= r < len(kwargs["prompt_tokens"]) for r in rows)
        assert all(rows.count(r) <= limit for r in set(rows))
    else:
        n = len(kwargs["prompts"] if method == "text_completion" else kwargs["dialogs"])
        assert len(result) == n
        for r in result:
            assert ("logprobs" in r) == kwargs.get("logprobs", False)


def test_request_mutations_fail_cleanly_or_give_a_correct_result(llama):
    rng = random.Random(99)
    outcomes = {"refused": 0, "answered": 0}
    for _ in range(N_REQUESTS):
        method, kwargs = mutate_request(rng)
        call = getattr(llama, method)
        try:
            if method in ("generate", "stream"):
                args = (kwargs.pop("prompt_tokens"), kwargs.pop("max_gen_len"))
                result = call(*args, **kwargs)
                result = list(result) if method == "stream" else result
                kwargs.update(prompt_tokens=args[0], max_gen_len=args[1])
            else:
                result = call(**kwargs)
        except (TypeError, ValueError) as e:
            assert str(e) and "\n" not in str(e), (method, kwargs, e)
            outcomes["refused"] += 1
            continue
        check_result(llama, method, kwargs, result)
        outcomes["answered"] += 1
    assert outcomes["refused"] > N_REQUESTS // 4 and outcomes["answered"] > N_REQUESTS // 6, outcomes
    print(f"request mutations ({N_REQUESTS}): {outcomes}")
