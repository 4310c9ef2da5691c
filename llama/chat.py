"""An interactive multi-turn chat with streamed answers, on one process or under torchrun.

    python scripts/chat.py                       # the bundled demo model
    python scripts/chat.py --ckpt_dir Meta-Llama-3-8B-Instruct/ --system "Answer briefly."
    torchrun --nproc_per_node 2 scripts/chat.py --ckpt_dir ...  # rank 0 reads, every rank follows
    printf 'Hi\\nWhat is a tuple?\\n' | python scripts/chat.py  # one user turn per line

Commands: /reset clears the history (the system prompt stays), /exit (or end of input) quits.
Ctrl-C stops the answer being written; what was written of it stays in the history.
"""
import sys
from datetime import timedelta
from typing import List, Optional, Tuple, Union

import torch.distributed as dist

from llama import distributed
from llama import cli, launch
from llama.generation import Llama
from llama.tokenizer import ChatFormat, Message

# The other ranks wait in a broadcast while the user types; the default collective timeout
# (10 minutes with NCCL, 30 with gloo) would end an idle chat, so lines travel in their own group.
IDLE_TIMEOUT = timedelta(days=7)
# Off a terminal the answers are all stdout holds; an answer may span lines, so a line of its own
# stands between two answers (none before the first or after the last).
PIPED_SEPARATOR = "---\n"


def trim_history(
    formatter: ChatFormat, system: List[Message], history: List[Message], budget: int
) -> Tuple[List[Message], int]:
    """Drop the oldest turns (a user message and its answer) until the prompt for
    system + history has at most `budget` tokens.

    `history` alternates user and assistant messages and ends with the new user message. The system
    messages and that last message are always kept. Returns (kept history, number of turns dropped);
    raises ValueError when the system messages and the last message alone exceed the budget.
    """
    dropped = 0
    while len(formatter.encode_dialog_prompt(system + history)) > budget:
        if len(history) <= 1:
            raise ValueError(f"the system prompt and the last message alone exceed {budget} tokens")
        history = history[2:]  # a user message and its answer, so the roles keep alternating
        dropped += 1
    return history, dropped


class ChatSession:
    """A conversation with one Llama: the history, its trimming, and one streamed answer per turn.

    Under torchrun every rank runs the same session on the same inputs, so that all ranks take part
    in every forward pass; only the session with `show` set prints.
    """

    def __init__(
        self,
        generator: Llama,
        system: Optional[str] = None,
        max_gen_len: int = 256,
        temperature: float = 0.6,
        top_p: float = 0.9,
        seed: Optional[int] = None,
        show: bool = True,
        tty: bool = False,
    ):
        max_seq_len = generator.model.params.max_seq_len
        if not 0 < max_gen_len < max_seq_len:
            raise ValueError(
                f"max_gen_len {max_gen_len} leaves no room for a prompt within max_seq_len {max_seq_len}: "
                "pass a smaller --max_gen_len or a larger --max_seq_len"
            )
        self.generator = generator
        self.system: List[Message] = [{"role": "system", "content": system}] if system else []
        self.history: List[Message] = []
        self.budget = max_seq_len - max_gen_len  # prompt tokens, leaving room for a whole answer
        self.sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, seed=seed)
        self.show = show
        self.tty = tty
        self.n_answers = 0

    def say(self, text: str) -> None:
        """Write answer text to stdout at once (it streams), if this session shows output."""
        if self.show:
            sys.stdout.write(text)
            sys.stdout.flush()

    def note(self, text: str) -> None:
        """Tell the user something on stderr, so that stdout holds only the answers when piped."""
        if self.show:
            sys.stdout.flush()
            print(f"[{text}]", file=sys.stderr, flush=True)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = []

    def turn(self, text: str) -> Optional[str]:
        """Answer one user message, streaming the answer; returns it (None if the message was refused).

        Ctrl-C (KeyboardInterrupt) while the answer streams stops it; the part written so far is
        kept as the answer. With several processes, it ends the run instead: the ranks would stop
        at different steps and wait for each other forever.
        """
        formatter = self.generator.formatter
        message: Message = {"role": "user", "content": text}
        n_alone = len(formatter.encode_dialog_prompt(self.system + [message]))
        if n_alone > self.budget:
            self.note(
                f"message not sent: with the system prompt it takes {n_alone} tokens, and at most "
                f"{self.budget} fit (max_seq_len minus max_gen_len)"
            )
            return None
        self.history, dropped = trim_history(formatter, self.system, self.history + [message], self.budget)
        if dropped:
            self.note(f"history trimmed: the oldest {dropped} turn(s) no longer fit in max_seq_len")
        prompt = formatter.encode_dialog_prompt(self.system + self.history)

        self.say("Assistant: " if self.tty else PIPED_SEPARATOR if self.n_answers else "")
        self.n_answers += 1
        pieces: List[str] = []
        try:
            for step in self.generator.stream([prompt], **self.sampling):
                for token in step:
                    pieces.append(token.text)
                    self.say(token.text)
        except KeyboardInterrupt:
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise
            self.say("\n")
            self.note("answer stopped")
        else:
            self.say("\n")
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def read_line(prompt: str) -> Optional[str]:
    """One line from standard input without its newline, None at end of input. Ctrl-C discards
    the line being typed and asks again, as shells do."""
    while True:
        try:
            return input(prompt)
        except EOFError:
            if prompt:
                print()  # leave the terminal on a fresh line
            return None
        except KeyboardInterrupt:
            print("\n[/exit or Ctrl-D to quit]", file=sys.stderr, flush=True)


def run(session: ChatSession) -> None:
    """The read-answer loop. Rank 0 reads each line and sends it to every rank, so that all ranks
    handle the same commands and turns; end of input or /exit ends it on every rank."""
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    rank0 = distributed.is_rank0()
    prompt = "You: " if session.tty else ""
    while True:
        line = read_line(prompt) if rank0 else None
        line = distributed.broadcast_object(line, group=group)
        if line is None or line.strip() == "/exit":
            return
        line = line.strip()
        if line == "/reset":
            session.reset()
            session.note("history cleared")
        elif line:
            session.turn(line)


def chat(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: int = 128,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    remeasure: bool = False,
    verify: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    draft_ckpt_dir: Optional[str] = None,
    speculate: bool = False,
    speculate_k: Union[int, str] = 4,
    adapter: Optional[str] = None,
):
    """Chat with a Llama 3 instruct checkpoint, or with no arguments the bundled demo model.

    Type a message and Enter; the answer streams back. /reset clears the history (keeping the
    system prompt), /exit or Ctrl-D quits, Ctrl-C stops an answer. When the history no longer fits
    max_seq_len (with max_gen_len left for the answer) its oldest turns are dropped. Piped input is
    read one user message per line and only the answers are printed (notes go to stderr).

    Args:
        ckpt_dir: Meta checkpoint directory; omit it (and tokenizer_path) for the bundled demo model.
        tokenizer_path: the checkpoint's tokenizer.model (default: ckpt_dir/tokenizer.model).
        system: a system prompt, kept for the whole conversation.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest conversation + answer, in tokens.
        max_gen_len: most tokens per answer (room kept free for it in max_seq_len).
        seed: the sampling seed of every answer, so that an answer does not depend on the ones
            before it; default: the random stream seeded at start-up (the same on every rank).
        device: cuda or cpu (default: cuda when available).
        dtype: bfloat16, float16 or float32 (default: the device's best).
        remeasure: time this machine's kernels again instead of reading the choice an earlier run kept
            (also LLAMA_REMEASURE=1).
        verify: check the checkpoint's files against its checklist.chk (md5) before loading.
        quantize: int8, int4 (or fp8 on CUDA sm89+) weight-only quantization on load, or w8a8 (int8
            weights and activations, x86 CPUs); none by default;
            a checkpoint from scripts/quantize.py loads quantized as stored.
        group_size: int4 group size (32, 64, 128, 256).
        draft_ckpt_dir: a draft model (same tokenizer) for speculative decoding: it proposes
            speculate_k tokens per step, the model verifies them in one pass (greedy output unchanged).
        speculate: decode speculatively; with the demo model and no draft_ckpt_dir, its bundled draft.
        speculate_k: draft tokens proposed per step, 1 to 16, or auto (adapted after each step).
        adapter: a LoRA adapter directory (llama-finetune's OUT_DIR/adapter), applied unmerged.
    """
    generator = launch.build_generator(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        device=device,
        dtype=dtype,
        remeasure=remeasure,
        verify=verify,
        quantize=quantize,
        group_size=group_size,
        speculate=speculate,
        draft_ckpt_dir=draft_ckpt_dir,
        speculate_k=speculate_k,
        adapter=adapter,
    )
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    session = ChatSession(
        generator,
        system=None if system is None else str(system),  # fire turns `--system 42` into an int
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        show=distributed.is_rank0(),
        tty=tty,
    )
    if tty:
        session.note("/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops an answer")
    try:
        run(session)
    finally:
        distributed.shutdown()


def main() -> None:
    """Console entry point (llama-chat)."""
    cli.run(chat)


if __name__ == "__main__":
    main()
