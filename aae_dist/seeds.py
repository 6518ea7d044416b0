"""Every seed aae-dist derives, in one place.

Randomness is a function of (seed, rank, step) and of named purposes, never of RNG state, so a
resumed run replays exactly and every rank knows what every other rank draws."""

from __future__ import annotations

_STEP_A, _STEP_B = 1_000_003, 1_000_033  # large primes: (seed, rank, step) -> distinct streams
_EVAL, _PARZEN, _GENERATE = 12_345, 777, 100_003


def step(seed: int, rank: int, step_index: int) -> int:
    """The generator of one training step on one rank (noise, prior samples, labelled draws); modulo 2**64,
    what torch takes (the same value for every seed that fitted before)."""
    return ((seed * _STEP_A + rank) * _STEP_B + step_index) % 2**64


def evaluation(seed: int) -> int:
    """Encoder noise during evaluation."""
    return seed + _EVAL


def parzen(seed: int) -> int:
    """Decoded prior samples of the Parzen estimate: the same on every rank."""
    return seed + _PARZEN


def generate_chunk(seed: int, chunk: int) -> int:
    """One chunk of `aae-dist generate` (chunks run as independent tasks)."""
    return seed * _GENERATE + chunk


def shuffle(seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch, shared by all ranks."""
    return [seed, epoch]


def shuffle_buffer(seed: int, epoch: int, rank: int) -> list[int]:
    """A rank's within-buffer shuffle."""
    return [seed, epoch, rank, 1]


def labelled_subset(seed: int) -> list[int]:
    """Which samples keep their labels (data.labeled_per_class): independent of the rank count."""
    return [seed, 7]
