"""The books of a block KV cache (llama.kv_cache.BlockKVCache): which blocks are free, which a
sequence holds, and which hold a cached prefix. Nothing here touches a tensor: the scheduler asks
for blocks as sequences grow and gives them back when they finish or are preempted; the model
reads and writes through the tables.

Automatic prefix caching: a full block is keyed by a hash of its tokens and of every token before
it (the previous block's key chained in), so equal keys mean equal contents. A block keeps its key
after its sequence lets go of it: it is then free to take but still cached, and a new sequence
whose context starts with the same tokens takes it instead of computing it again. Unkeyed free
blocks are handed out first, then cached ones, least recently used first (their keys dropped).
Keys are 128-bit BLAKE2b digests of the previous key and the block's token ids: the same on every
process (under torchrun every rank keeps the same books), and, unlike Python's hash of a tuple, not
something a client could make collide on purpose to be served another prompt's keys and values.
"""
import array
import hashlib
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Sequence

# tokens per block: see docs/serving.md for the measurement behind it
DEFAULT_BLOCK_SIZE = 16


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


def chain_keys(tokens: Sequence[int], block_size: int, n: int, keys: Optional[List[int]] = None) -> List[int]:
    """The keys of the first `n` full blocks of `tokens`, extending `keys` (those of the first blocks)."""
    keys = [] if keys is None else keys
    for i in range(len(keys), n):
        h = hashlib.blake2b(digest_size=16)
        h.update((keys[-1] if keys else 0).to_bytes(16, "little"))
        h.update(array.array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        keys.append(int.from_bytes(h.digest(), "little"))
    return keys


class BlockManager:
    """A pool of `blocks` blocks of `block_size` tokens, block 0 kept back (the one table entries
    past a sequence's blocks point to: llama.kv_cache.BlockKVCache). A sequence's block table is a
    list of block numbers, position p in block table[p // block_size]. `prefix_cache`: keep full
    blocks' contents for later sequences (see the module's docstring)."""

    def __init__(self, blocks: int, block_size: int, prefix_cache: bool = True):
        if blocks < 2:
            raise ValueError(f"a block KV cache needs at least 2 blocks, got {blocks}")
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self.capacity = blocks - 1  # blocks a sequence may ever get
        self.free: Deque[int] = deque(range(1, blocks))  # free and unkeyed
        self.evictable: "OrderedDict[int, None]" = OrderedDict()  # free and keyed, least recently used first
        self.refs = [0] * blocks
        self.cached: Dict[int, int] = {}  # key -> block
        self.key_of: Dict[int, int] = {}  # block -> key
        self.queries = 0  # context tokens of admitted sequences looked up, and of them found cached
        self.hits = 0

    @property
    def n_free(self) -> int:
        """Blocks a sequence may take: free ones and cached ones no sequence holds."""
        return len(self.free) + len(self.evictable)

    @property
    def n_used(self) -> int:
        return self.capacity - self.n_free

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` tokens could ever be held (the whole pool to itself)."""
        return self.blocks_for(tokens) <= self.capacity

    def grow(self, table: List[int], tokens: int) -> bool:
        """Extend `table` with free blocks until it holds `tokens` tokens; False (and nothing taken)
        when too few are free."""
        more = self.blocks_for(tokens) - len(table)
        if more <= 0:
            return True
        if more > self.n_free:
            return False
        for _ in range(more):
            if self.free:
                b = self.free.popleft()
            else:  # the least recently used cached block: its contents are forgotten
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.key_of.pop(b)]
            self.refs[b] = 1
            table.append(b)
        return True

    def release(self, table: List[int]) -> None:
        """Give back the blocks of `table` (emptied); keyed ones stay cached."""
        for b in reversed(table):  # a chain's last blocks are evicted before its first ones
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        table.clear()

    def match(self, context: Sequence[int], table: List[int], keys: List[int]) -> int:
        """Take into the empty `table` the longest chain of cached blocks that `context` starts with
        (leaving at least its last token to compute: its logits are needed), their keys into the
        empty `keys`; returns the tokens they hold."""
        if not self.prefix_cache:
            return 0
        for key in chain_keys(context, self.block_size, (len(context) - 1) // self.block_size):
            b = self.cached.get(key)
            if b is None:
                break
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
            table.append(b)
            keys.append(key)
        return len(table) * self.block_size

    def register(self, tokens: Sequence[int], table: List[int], n_tokens: int, keys: List[int]) -> None:
        """Key the full blocks of `table` among its first `n_tokens` `tokens` (computed in both the
        model's and any draft's cache), extending `keys`, the sequence's keys so far. A block whose
        key another block already has stays unkeyed (it is freed, not cached, when let go)."""
        if not self.prefix_cache:
            return
        start = len(keys)
        for i, key in enumerate(chain_keys(tokens, self.block_size, n_tokens // self.block_size, keys)[start:], start):
            b = table[i]
            if key not in self.cached and b not in self.key_of:
                self.cached[key], self.key_of[b] = b, key

    def check(self) -> None:
        """Raise AssertionError unless every block is free, cached or held, each once (tests)."""
        held = {b for b in range(1, len(self.refs)) if self.refs[b] > 0}
        free, evictable = set(self.free), set(self.evictable)
        assert len(free) == len(self.free) and not (free & held) and not (evictable & held) and not (free & evictable)
        assert len(free) + len(evictable) + len(held) == self.capacity, "a block neither free, cached nor held"
        assert all(self.cached[k] == b for b, k in self.key_of.items()) and len(self.cached) == len(self.key_of)
        assert evictable <= set(self.key_of), "a free block in the cache's queue without a key"
