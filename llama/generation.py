# The Llama facade: build from a Meta checkpoint, then generate, stream, complete text or chat over the engine.
import logging
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, TypedDict, Union

import torch

from llama import distributed, kv_cache, validation
from llama.engine import Engine, NonFiniteLogitsError, Request, SequenceState, speculative  # noqa: F401 (re-exported)
from llama.engine.blocks import DEFAULT_BLOCK_SIZE, blocks_for
from llama.model import Transformer
from llama.runtime.compiled import CompiledStep, mark_static, static_cache_len
from llama.runtime.policy import Policy
from llama.sampling import sample_top_p, sampling_options  # noqa: F401 (Meta's API: llama.generation.sample_top_p)
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer
from llama.weights import loader

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
        verify: bool = False,
        quantize: Optional[str] = None,
        group_size: int = 32,
        quantize_output: bool = True,
        draft_ckpt_dir: Optional[str] = None,
        speculate_k: Union[int, str] = speculative.DEFAULT_K,
        draft_parallel: str = speculative.REPLICATED,
        adapter: Optional[str] = None,
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
                step. None: the device's policy (llama.runtime): bfloat16 on CUDA where supported,
                else float16; on CPU, measured at start-up: for example bfloat16 weights decoding in
                bfloat16 and prefilling in float32 where that is what the CPU does fastest.
            rope_scale_factor: Llama 3.1 RoPE scale for models with use_scaled_rope; None reads
                params.json or, failing that, uses the published default for the model's shape.
            compile: torch.compile the decode step, with static shapes (the KV cache padded to a
                power-of-two length) and CUDA graphs on GPU; the first request of each batch size
                and cache length compiles. With a draft model, its steps and the verify passes of
                speculate_k + 1 tokens are compiled too, and on one process a step whose rows all
                decode greedily runs all of them in one compiled call (llama.engine.speculative). Where
                compilation fails, a warning is logged and decoding runs eagerly.
            verify: first check every file against the checkpoint's checklist.chk (Meta's md5 list).
            quantize: None (full precision, exactly as stored), "int8", "int4" or "fp8" (CUDA sm89+):
                weight-only quantization of the seven projections of every block (and of the output
                projection and the embedding), done on load by each rank from its own slice (llama.weights). A
                checkpoint written by scripts/quantize.py loads quantized as stored with None or
                its own mode; another mode is an error. "w8a8" (x86 CPUs): int8 weights, whose block
                projections also round each input row to int8 (one scale per row, at every product)
                and multiply integers through fbgemm; not weight-only; loads int8 checkpoints.
            group_size: int4 group size along the input dimension (32, 64, 128 or 256).
            quantize_output: quantize the vocabulary matrices too, the output projection and the
                embedding (one matrix in a tied model); False keeps both in full precision.
                With dtype=None the quantized products run in the dtype measured fastest for each
                kind of step (llama.runtime.quant_choice); a dtype given runs them in that dtype.
            draft_ckpt_dir: a small draft model (Meta format, the same vocabulary and tokenizer) for
                speculative decoding (llama.engine.speculative): it proposes `speculate_k` tokens per step and
                the model verifies them in one pass; greedy output stays the model's own, sampling
                keeps its distribution. Loaded in the same dtype policy, never quantized.
            speculate_k: draft tokens proposed per step, 1 to 16, or "auto": adapted after each step
                (two more after a step whose proposals were all accepted, else one fewer; 1 to 8).
            draft_parallel: under torchrun, "replicated" (the default: the draft whole on every rank,
                its steps talk to no one) or "sharded" (split over the model-parallel ranks like the
                model, one all-reduce per projection pair); docs/benchmarks.md says which is faster.
            adapter: a LoRA adapter directory (llama-finetune's OUT_DIR/adapter) applied unmerged.

        Works under torchrun (one process per model-parallel rank) and as a plain `python` call.
        """
        start = time.perf_counter()
        if draft_ckpt_dir is not None:  # before minutes of loading
            speculative.check_k(speculate_k)
            speculative.check_draft_parallel(draft_parallel)
        loaded = loader.load(
            ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed, device, dtype,
            rope_scale_factor, verify, quantize, group_size, quantize_output, draft_ckpt_dir,
            draft_sharded=draft_parallel == speculative.SHARDED, adapter=adapter,
        )
        speculator = None
        if loaded.draft is not None:
            speculator = speculative.Speculator(loaded.draft, speculate_k, loaded.draft_context, loaded.draft_policy)
            _log_draft(draft_ckpt_dir, speculate_k, draft_parallel)
        if distributed.is_rank0():  # the loader has logged the shards and their load time
            logger.info(
                "Loaded in %.2f seconds: running on %s in %s; tokenizer %s (%d tokens)",
                time.perf_counter() - start, loaded.device, str(loaded.policy.weights).removeprefix("torch."),
                tokenizer_path, loaded.tokenizer.n_words,
            )
        return Llama(loaded.model, loaded.tokenizer, compile=compile, speculator=speculator, policy=loaded.policy)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        compile: bool = False,
        speculator: Optional[speculative.Speculator] = None,
        policy: Optional[Policy] = None,
    ):
        """A generator over a loaded model (`build` loads one). compile: torch.compile the decode
        step (see `build`); speculator: a draft model for speculative decoding; policy: the kernel
        policy every step of the model runs under (llama.runtime; None: PyTorch's defaults)."""
        self.model = model
        self.tokenizer = tokenizer
        self.speculator = speculator  # the draft model, when decoding speculatively
        self.policy = policy
        self.formatter = ChatFormat(tokenizer)
        # compile=True: one compiled forward pass per model, for decode steps and (with a draft)
        # the verify pass; the draft's steps get their own, and greedy steps one of both models
        self._compiled = CompiledStep(model, policy=policy) if compile else None
        if self._compiled is not None and speculator is not None:
            speculator.compiled = speculative.compiled_passes(model, speculator, self._compiled, policy)

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
            validation.check_prompt_length(len(t), params.max_seq_len, name=f"prompt {i}")

    def _start(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        prompt_logprobs: bool,
        seed: Optional[int],
        options: dict,
    ) -> tuple[Engine, List[int]]:
        """An engine over a KV cache large enough for this request, with one sequence per prompt
        (each with its own generator from `seed`, so a row's tokens do not depend on its batch);
        `options`: more Request fields (`sampling_options`)."""
        self._check_request(prompt_tokens)
        params = self.model.params
        # each row gets max_gen_len new tokens within max_seq_len (the original's total_len)
        total_len = max(min(params.max_seq_len, len(t) + max(0, max_gen_len)) for t in prompt_tokens)
        engine = self.engine(len(prompt_tokens), total_len)
        ids = [
            engine.add(Request(t, max_gen_len, temperature, top_p, seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                               **options))
            for t in prompt_tokens
        ]
        return engine, ids

    def engine(self, rows: int, seq_len: int, kv_cache_tokens: Optional[int] = None, **options) -> Engine:
        """A continuous-batching engine (llama.engine) for `rows` sequences of `seq_len` tokens together, over a block
        KV cache of `kv_cache_tokens` (default rows x seq_len; a larger one kept), or with compile=True
        over rows of seq_len rounded up to a power of two (the static shapes of compiled passes). options: Engine's."""
        if compiled := self._compiled is not None:
            kv_cache.allocate(self.model, rows, static_cache_len(seq_len, self.model.params.max_seq_len), keep=True)
        else:  # and block 0, kept back
            blocks = blocks_for(kv_cache_tokens or rows * seq_len, DEFAULT_BLOCK_SIZE) + 1
            kv_cache.allocate_blocks(self.model, blocks, DEFAULT_BLOCK_SIZE, rows, seq_len, keep=True)
        engine = Engine(
            self.model, self.tokenizer, self._compiled, static_shapes=compiled, speculator=self.speculator, policy=self.policy,
            **options)
        if compiled:  # after the engine has fitted the draft's cache to the model's
            for model in [self.model] + ([self.speculator.draft] if self.speculator else []):
                mark_static(model)
        return engine

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        top_k: int = 0, min_p: float = 0.0, response_format: Optional[dict] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate from token prompts; temperature 0 is greedy, otherwise nucleus (top_p) sampling.

        Returns (tokens, logprobs or None) per prompt: cut at len(prompt) + max_gen_len and before the
        first stop token (not returned); `echo` includes the prompt. `seed` makes this request's
        sampling reproducible on its own (the same on every rank): each row draws from its own
        generator seeded with it, so a row's tokens do not depend on the rest of the batch. None
        uses the global RNG. `top_k`, `min_p` and `response_format` (an answer held to JSON): see
        `sampling_options`.
        """
        validation.check_request(
            self.model.params.vocab_size, prompt_tokens=prompt_tokens, temperature=temperature, top_p=top_p,
            max_gen_len=max_gen_len, seed=seed, logprobs=logprobs, echo=echo, max_gen_len_optional=False,
        )
        options = sampling_options(top_k, min_p, response_format)
        tokens, lps, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed, options)
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
        options: dict,
    ) -> tuple[List[List[int]], List[List[float]], List[Optional[int]]]:
        """generate(), plus the stop token that ended each sequence (None: it ran out of tokens)."""
        engine, ids = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs, logprobs and echo, seed, options)
        for _ in engine.run():
            pass
        out_tokens, out_logprobs, out_stops = [], [], []
        for prompt, seq_id in zip(prompt_tokens, ids):
            s = engine.pop(seq_id)
            toks, lps = self._output(prompt, s, logprobs, echo)
            out_tokens.append(toks)
            out_logprobs.append(lps)
            out_stops.append(s.stop_token)
        return out_tokens, out_logprobs, out_stops

    def _output(self, prompt: List[int], s: SequenceState, logprobs: bool, echo: bool) -> tuple[List[int], List[float]]:
        """A finished sequence as `generate` returns it: without its stop token, after its prompt
        with `echo` (cut at the prompt's own first stop token, as the original), its log-probs."""
        n = len(s.tokens) - (s.stop_token is not None)  # the stop token is not returned
        toks = (prompt if echo else []) + s.tokens[:n]
        lps = []
        if logprobs:
            lps = ([0.0] + s.prompt_logprobs[1:] if echo else []) + s.logprobs[:n]
        if echo:
            for stop_token in self.tokenizer.stop_tokens:
                if stop_token in toks:
                    cut = toks.index(stop_token)
                    toks, lps = toks[:cut], lps[:cut]
        return toks, lps

    def stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        seed: Optional[int] = None,
        top_k: int = 0, min_p: float = 0.0, response_format: Optional[dict] = None,
    ) -> Iterator[List[StreamToken]]:
        """Generate like `generate`, yielding each step's new token of every unfinished sequence.

        A sequence's `text` pieces joined give its decoded generation; characters split across tokens
        appear once complete. The stop token ends a sequence with `finished` and empty text.
        """
        validation.check_request(
            self.model.params.vocab_size, prompt_tokens=prompt_tokens, temperature=temperature, top_p=top_p,
            max_gen_len=max_gen_len, seed=seed, logprobs=logprobs, max_gen_len_optional=False,
        )
        options = sampling_options(top_k, min_p, response_format)
        engine, ids = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, seed, options)
        index = {seq_id: i for i, seq_id in enumerate(ids)}
        for events in engine.run():
            out = [StreamToken(index[e.seq_id], e.token, e.text, e.logprob, e.finished) for e in events if e.token is not None]
            for e in events:
                if e.finished:
                    engine.pop(e.seq_id)
            if out:
                yield sorted(out, key=lambda t: t.index)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        top_k: int = 0, min_p: float = 0.0, response_format: Optional[dict] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt (bos is added). max_gen_len defaults to max_seq_len - 1. `top_k`,
        `min_p`, `response_format`: see `sampling_options`."""
        validation.check_request(
            self.model.params.vocab_size, prompts=prompts, temperature=temperature, top_p=top_p,
            max_gen_len=max_gen_len, seed=seed, logprobs=logprobs, echo=echo,
        )
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed, top_k, min_p, response_format)
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
        top_k: int = 0, min_p: float = 0.0, response_format: Optional[dict] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog in the Llama 3 chat format. max_gen_len defaults to max_seq_len - 1.

        A Llama 3.1 answer that calls a tool comes back with `tool_calls` (llama.tokenizer.ToolCall)
        and `stop_reason` ("end_of_message" when it waits for the tool's result, as `ipython` turn).
        `top_k`, `min_p`, `response_format` (e.g. {"type": "json_object"}): see `sampling_options`.
        """
        validation.check_request(
            self.model.params.vocab_size, dialogs=dialogs, temperature=temperature, top_p=top_p,
            max_gen_len=max_gen_len, seed=seed, logprobs=logprobs,
        )
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        options = sampling_options(top_k, min_p, response_format)
        tokens, lps, stops = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, seed, options)
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


def _log_draft(draft_dir: str, k: Union[int, str], parallel: str) -> None:
    """One line on rank 0: the draft and how many tokens it proposes per step."""
    if distributed.is_rank0():
        mp_size = distributed.model_parallel_size()
        how = "" if mp_size == 1 else f", {parallel} over {mp_size} ranks"
        count = f"1 to {speculative.AUTO_MAX_K} (adaptive)" if k == speculative.AUTO else k
        logger.info("Speculative decoding: draft %s proposes %s tokens per step%s", draft_dir, count, how)
