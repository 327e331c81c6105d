"""Sample order as pure functions of (seed, epoch, index): O(1) to evaluate anywhere, no stored state.

`permute(i, n, key)` is a keyed pseudo-random bijection of [0, n) (a 4-round Feistel network on the
smallest even-bit power of two >= n, with cycle walking back into range). Evaluating it at index 10**8 costs
the same as at index 0, which is what makes resume O(1) and independent of how many ranks ask.
"""

from __future__ import annotations

import numpy as np

from llmtrain.errors import DataError

_MASK = 0xFFFFFFFFFFFFFFFF


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-distributed 64-bit hash (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):  # numpy warns on wrapping scalars (not arrays); wrapping is the point
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_int(z: int) -> int:
    """`mix64` of one Python int (no numpy call overhead: keys are derived on every batch)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, source, epoch, ...), each step hashed."""
    k = 0x243F6A8885A308D3
    for p in parts:
        k = _mix_int(k ^ (int(p) & _MASK))
    return k


def _feistel(x: np.ndarray, half_bits: int, round_keys: list[np.uint64]) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    sh = np.uint64(half_bits)
    left, right = x >> sh, x & mask
    for rk in round_keys:
        left, right = right, left ^ (mix64(right ^ rk) & mask)
    return (left << sh) | right


def permute(i: np.ndarray | int, n: int, key: int) -> np.ndarray:
    """The position-`i` element of a keyed random permutation of range(n); vectorised over `i`."""
    x = np.atleast_1d(np.asarray(i, dtype=np.uint64)).copy()
    if n <= 1:
        return np.zeros_like(x)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    round_keys = [np.uint64(derive_key(key, r)) for r in range(4)]
    todo = np.arange(len(x))
    # Cycle walking: the Feistel domain is < 4n, so each element needs under 4 rounds on average.
    while len(todo):
        x[todo] = _feistel(x[todo], half_bits, round_keys)
        todo = todo[x[todo] >= np.uint64(n)]
    return x


def blend_table(weights: list[float], block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleave sources within a block of `block` samples with exact integer counts per source.

    Returns (source id per position, ordinal of that position within its source, samples per block of
    each source). Counts come from largest remainders; the order is greedy "most behind its target
    first", so every prefix of the block stays within one sample of the exact proportion.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"data.sources weights must be >= 0 with a positive sum; got {list(weights)}")
    w = w / w.sum()
    counts = np.floor(w * block).astype(np.int64)
    rem = w * block - counts
    for k in np.argsort(-rem, kind="stable")[: block - counts.sum()]:
        counts[k] += 1
    src = np.empty(block, dtype=np.int64)
    ordinal = np.empty(block, dtype=np.int64)
    taken = np.zeros(len(w), dtype=np.int64)
    for p in range(block):
        k = int(np.argmax(counts * (p + 1) / block - taken))
        src[p], ordinal[p] = k, taken[k]
        taken[k] += 1
    return src, ordinal, counts
