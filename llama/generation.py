# The Llama generator: build from a Meta checkpoint, then generate, complete text or chat.
import codecs
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, TypedDict, Union

import torch
import torch.nn.functional as F

from llama import checkpoint, distributed, kernels
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

logger = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


@dataclass
class StreamToken:
    """One new token of one sequence, as `Llama.stream` yields it."""

    index: int  # row of the batch
    token: int
    text: str  # the printable text this token completes ("" for a stop token or a partial character)
    logprob: Optional[float]
    finished: bool  # the sequence ends with this token (stop token or length limit)


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        rope_scale_factor: Optional[float] = None,
        compile: bool = False,
    ) -> "Llama":
        """Load a Meta-format checkpoint and its tokenizer.

        Args:
            ckpt_dir: directory with params.json and consolidated.NN.pth.
            tokenizer_path: the tiktoken tokenizer.model of this checkpoint.
            max_seq_len: longest sequence (prompt + generation) a request may use.
            max_batch_size: most prompts in one request.
            model_parallel_size: processes per model; default: all processes of the group.
            seed: random seed, the same on every rank so that all ranks sample the same tokens.
            device: "cuda", "cpu", a torch.device, or None for CUDA when available, else CPU.
            dtype: "bfloat16", "float16", "float32", a torch.dtype: that dtype for weights and every
                step. None: the device's policy (llama.kernels): bfloat16 on CUDA where supported,
                else float16; on CPU, measured at start-up: for example bfloat16 weights decoding in
                bfloat16 and prefilling in float32 where that is what the CPU does fastest.
            rope_scale_factor: Llama 3.1 RoPE scale for models with use_scaled_rope; None reads
                params.json or, failing that, uses the published default for the model's shape.
            compile: torch.compile the decode step, with static shapes (the KV cache padded to a
                power-of-two length) and CUDA graphs on GPU; the first request of each batch size
                and cache length compiles. Where compilation fails, a warning is logged and decoding
                runs eagerly.

        Works under torchrun (one process per model-parallel rank) and as a plain `python` call.
        """
        start = time.perf_counter()
        device = distributed.resolve_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dtype is not None:
            kernels.parse_dtype(dtype)  # a bad name fails before any process group is set up
        mp_size = distributed.setup(device, model_parallel_size)
        torch.manual_seed(seed)

        params = checkpoint.read_params(ckpt_dir)
        tokenizer = Tokenizer(model_path=str(tokenizer_path))
        args = ModelArgs(**{**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
        if args.use_scaled_rope:
            args.rope_scale_factor = _rope_scale_factor(params, rope_scale_factor)
        if tokenizer.n_words != args.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but {ckpt_dir}/params.json says "
                f"vocab_size {args.vocab_size}: pass the tokenizer.model that belongs to this checkpoint"
            )
        policy = kernels.policy_for(device, dtype)  # the same on every rank (rank 0's)
        dtype = policy.weights
        model = checkpoint.load_model(ckpt_dir, args, distributed.model_parallel_rank(), mp_size, device, dtype)
        model.policy = policy
        if distributed.is_rank0():  # the checkpoint module has logged the shards and their load time
            logger.info(
                "Loaded in %.2f seconds: running on %s in %s; tokenizer %s (%d tokens)",
                time.perf_counter() - start, device, str(dtype).removeprefix("torch."), tokenizer_path, tokenizer.n_words,
            )
        return Llama(model, tokenizer, compile=compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self._compiled_decode = _compile_decode(model) if compile else None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _check_request(self, prompt_tokens: List[List[int]]) -> None:
        params = self.model.params
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}: "
                "send fewer at once or build with a larger max_batch_size"
            )
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, longer than max_seq_len {params.max_seq_len}: "
                    "shorten it or build with a larger max_seq_len"
                )

    def _limits(self, prompt_tokens: List[List[int]], max_gen_len: int) -> List[int]:
        """New tokens each row may get: max_gen_len, within max_seq_len (the original's total_len)."""
        max_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_len)
        return [max(0, min(max_gen_len, total_len - len(t))) for t in prompt_tokens]

    @torch.inference_mode()
    def _steps(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        prompt_logprobs: bool = False,
        seed: Optional[int] = None,
    ) -> Iterator[tuple]:
        """The generation loop. Yields, once, the prompt log-probs (or None), then per step the
        sampled tokens (bsz,), their log-probs (bsz,) or None, and which rows were already done."""
        self._check_request(prompt_tokens)
        params, device = self.model.params, self.device
        bsz = len(prompt_tokens)
        lens = [len(t) for t in prompt_tokens]
        max_len = max(lens)
        limits = self._limits(prompt_tokens, max_gen_len)
        total_len = max(n + k for n, k in zip(lens, limits))
        n_steps = max(limits)

        compiled = self._compiled_decode is not None
        cache_len = _static_cache_len(total_len, params.max_seq_len) if compiled else total_len
        rows, slots = self.model.cache_shape or (0, 0)
        if rows < bsz or slots < cache_len:  # size the KV cache to the request
            self.model.setup_cache(bsz, cache_len)
        if compiled:
            _mark_static(self.model)

        lens_t = torch.tensor(lens, device=device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        if prompt_logprobs:  # full logits for the prompt's own log-probs: prompts padded at the end
            tokens = torch.zeros(bsz, max_len, dtype=torch.long, device=device)
            for i, t in enumerate(prompt_tokens):
                tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            all_logits = self.model(tokens, 0)
            logits = all_logits[torch.arange(bsz, device=device), lens_t - 1]
            lp = -F.cross_entropy(all_logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
            yield torch.cat([torch.zeros(bsz, 1, device=device), lp], dim=1)
        else:
            yield None
            if n_steps == 0:
                return
            logits = self._prefill(prompt_tokens)

        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        limits_t = torch.tensor(limits, device=device)
        same_len = min(lens) == max_len
        done = limits_t <= 0
        for step in range(n_steps):
            next_token = _sample(logits, temperature, top_p, generator)
            token_lp = None
            if logprobs:
                token_lp = torch.log_softmax(logits, dim=-1).gather(1, next_token[:, None])[:, 0]
            yield next_token, token_lp, done
            done = done | torch.isin(next_token, stop_tokens) | (limits_t <= step + 1)
            if step + 1 == n_steps or bool(done.all()):  # the one host sync per step
                break
            # finished rows ride along; keep their positions inside the cache
            if same_len and not compiled:
                start_pos = max_len + step
            else:  # compiled: always per-row positions, so that the shapes stay the same
                start_pos = (lens_t + step).clamp(max=total_len - 1)
            logits = self._decode(next_token[:, None], start_pos)

    def _prefill(self, prompt_tokens: List[List[int]]) -> torch.Tensor:
        """Fill the KV cache with the prompts; return each one's last-position logits (bsz, vocab).

        Prompts of mixed lengths run longest first, in stages: each stage takes the positions up to
        the next prompt end, for the prompts that reach it (the first k), so no padding is computed;
        the original fed every prompt past the shortest one token per step. The cache rows, filled
        in that order, are then put back in the request's order; each row decodes from its own end.
        """
        device, bsz = self.device, len(prompt_tokens)
        order = sorted(range(bsz), key=lambda i: -len(prompt_tokens[i]))
        lens = [len(prompt_tokens[i]) for i in order]
        tokens = torch.zeros(bsz, lens[0], dtype=torch.long)
        for row, i in enumerate(order):
            tokens[row, : lens[row]] = torch.tensor(prompt_tokens[i], dtype=torch.long)
        tokens = tokens.to(device)
        ends, start = [], 0
        for end in sorted(set(lens)):
            k = sum(n >= end for n in lens)
            last = torch.full((k,), end - start - 1, device=device)
            logits = self.model(tokens[:k, start:end], start, output_index=last)[:, 0]
            ends.append(logits[k - lens.count(end) : k])  # the prompts that end here
            start = end
        logits = torch.cat(ends[::-1])  # longest first, as `order`
        if order != sorted(order):
            rank = torch.empty(bsz, dtype=torch.long)
            rank[order] = torch.arange(bsz)
            self.model.reorder_cache(rank.to(device))
            logits = logits[rank.to(device)]
        return logits

    def _decode(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor]) -> torch.Tensor:
        """Logits (bsz, vocab) of one new token per row: the compiled step when there is one."""
        if self._compiled_decode is not None:
            try:
                with kernels.kernels_for(tokens, self.model.policy, compiled=True):
                    torch.compiler.cudagraph_mark_step_begin()
                    return self._compiled_decode(tokens, start_pos)
            except Exception as e:  # a step rerun writes the same KV cache slots, so eager can take over
                logger.warning("compiled decoding failed, decoding eagerly from now on: %s", e)
                self._compiled_decode = None
        return self.model(tokens, start_pos)[:, -1]

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate from token prompts; temperature 0 is greedy, otherwise nucleus (top_p) sampling.

        Returns (tokens, logprobs or None) per prompt: cut at len(prompt) + max_gen_len and before the
        first stop token (not returned); `echo` includes the prompt. `seed` makes this request's
        sampling reproducible on its own (the same on every rank); None uses the global RNG.
        """
        tokens, lps, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed)
        return tokens, (lps if logprobs else None)

    def _generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        seed: Optional[int],
    ) -> tuple[List[List[int]], List[List[float]], List[Optional[int]]]:
        """generate(), plus the stop token that ended each sequence (None: it ran out of tokens)."""
        steps = self._steps(prompt_tokens, max_gen_len, temperature, top_p, logprobs, logprobs and echo, seed)
        prompt_lp = next(steps)
        gen = [(tok, lp) for tok, lp, _ in steps]
        bsz = len(prompt_tokens)
        gen_tokens = torch.stack([t for t, _ in gen], 1).tolist() if gen else [[] for _ in range(bsz)]
        gen_lps = torch.stack([lp for _, lp in gen], 1).tolist() if gen and logprobs else [[] for _ in range(bsz)]
        prompt_lps = prompt_lp.tolist() if prompt_lp is not None else None

        limits = self._limits(prompt_tokens, max_gen_len)
        out_tokens, out_logprobs, out_stops = [], [], []
        for i, prompt in enumerate(prompt_tokens):
            toks = (prompt if echo else []) + gen_tokens[i][: limits[i]]
            lps = ((prompt_lps[i][: len(prompt)] if echo else []) + gen_lps[i]) if logprobs else []
            lps = lps[: len(toks)]
            stop = None
            for stop_token in self.tokenizer.stop_tokens:
                if stop_token in toks:
                    cut = toks.index(stop_token)
                    toks, lps, stop = toks[:cut], lps[:cut], stop_token
            out_tokens.append(toks)
            out_logprobs.append(lps)
            out_stops.append(stop)
        return out_tokens, out_logprobs, out_stops

    def stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        seed: Optional[int] = None,
    ) -> Iterator[List[StreamToken]]:
        """Generate like `generate`, yielding each step's new token of every unfinished sequence.

        A sequence's `text` pieces joined give its decoded generation; characters split across tokens
        appear once complete. The stop token ends a sequence with `finished` and empty text.
        """
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompt_tokens]
        steps = self._steps(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, seed)
        next(steps)
        stop = set(self.tokenizer.stop_tokens)
        limits = self._limits(prompt_tokens, max_gen_len)
        finished = [k == 0 for k in limits]
        n_new = [0] * len(prompt_tokens)
        for tokens, lps, _ in steps:
            tokens = tokens.tolist()
            lps = lps.tolist() if lps is not None else [None] * len(tokens)
            out = []
            for i, (tok, lp) in enumerate(zip(tokens, lps)):
                if finished[i]:
                    continue
                n_new[i] += 1
                is_stop = tok in stop
                finished[i] = is_stop or n_new[i] >= limits[i]
                piece = self.tokenizer.model.decode_single_token_bytes(tok)
                text = "" if is_stop else decoders[i].decode(piece, final=False)
                if finished[i]:
                    text += decoders[i].decode(b"", final=True)
                out.append(StreamToken(i, tok, text, lp, finished[i]))
            if out:
                yield out

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt (bos is added). max_gen_len defaults to max_seq_len - 1."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed)
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for t, lp in zip(tokens, lps)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        seed: Optional[int] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog in the Llama 3 chat format. max_gen_len defaults to max_seq_len - 1.

        A Llama 3.1 answer that calls a tool comes back with `tool_calls` (llama.tokenizer.ToolCall)
        and `stop_reason` ("end_of_message" when it waits for the tool's result, as `ipython` turn).
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        tokens, lps, stops = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, seed)
        results: List[ChatPrediction] = []
        for i, t in enumerate(tokens):
            result: ChatPrediction = {"generation": self._assistant_message(t, stops[i])}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in t]
                result["logprobs"] = lps[i]
            results.append(result)
        return results

    def _assistant_message(self, tokens: List[int], stop: Optional[int]) -> Message:
        """The answer as a message: tool calls parsed (Llama 3.1), plain text exactly as the original."""
        reason = "out_of_tokens" if stop is None else "end_of_message" if stop == self.tokenizer.eom_id else "end_of_turn"
        message = self.formatter.decode_assistant_message(tokens, reason)
        if "tool_calls" not in message:
            return {"role": "assistant", "content": message["content"]}
        return message


def _compile_decode(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """torch.compile of one decode step, (bsz, 1) tokens at (bsz,) positions -> (bsz, vocab) logits,
    with static shapes; on CUDA with CUDA graphs ("reduce-overhead"), which remove the launch
    overhead that dominates small decode steps."""
    from fairscale.nn.model_parallel import mappings

    # fairscale's all-reduce marks its input dirty, which Dynamo cannot trace: taken whole into the
    # graph instead of breaking it at every layer (it is the identity on one process)
    torch.compiler.allow_in_graph(mappings.reduce_from_model_parallel_region)

    def decode_step(tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        return model._forward(tokens, start_pos, None, use_cache=True)[:, -1]

    device = model.tok_embeddings.weight.device
    return torch.compile(decode_step, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def _static_cache_len(total_len: int, max_seq_len: int) -> int:
    """KV cache length for compiled decoding: a power of two (at least 256), so that few shapes (few
    compilations) serve every request; decode attention then reads at most twice the context."""
    return min(max_seq_len, max(256, 1 << (total_len - 1).bit_length()))


def _mark_static(model: Transformer) -> None:
    """The KV cache and RoPE table keep their addresses across steps: CUDA graphs may use them in place."""
    torch._dynamo.mark_static_address(model.rope_table(model.tok_embeddings.weight.device))
    for layer in model.layers:
        torch._dynamo.mark_static_address(layer.attention.cache_k)
        torch._dynamo.mark_static_address(layer.attention.cache_v)


def _rope_scale_factor(params: dict, override: Optional[float]) -> float:
    from llama import registry

    if override is not None:
        factor, why = float(override), "as asked"
    elif "rope_scale_factor" in params:
        factor, why = float(params["rope_scale_factor"]), "from params.json"
    else:
        factor, why = registry.default_rope_scale_factor(params), "the published default for this shape"
    if distributed.is_rank0():
        logger.info("RoPE scaling factor %g (%s)", factor, why)
    return factor


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest prefix of the sorted distribution whose mass reaches `p`
    (the top token always), renormalise, draw one token per row. Returns (bsz, 1) token ids."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator)[:, 0]
    return torch.argmax(logits, dim=-1)
