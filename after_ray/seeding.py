"""Every seed the engine derives, in one place: same inputs, same stream, in any process.

Python's ``hash`` of a str is salted per process, so nothing here uses it; each rule hashes or
mixes its inputs explicitly. The rules are part of what a run *is*: a resumed run, a TAPT
cache key and a committed demo report depend on them drawing exactly what they drew before, so
a change to any of them is a change of every outcome (``tests`` pin a few derived values).

- :func:`blake2b_seed`: a 63-bit seed from mixed ints and strings (fine-tuning order, crops,
  dropout, MC dropout, head init), by BLAKE2b of the parts joined with ``\\x1f``.
- :func:`seedsequence_seed`: a 63-bit seed from integers (TAPT: run seed, rank, step, stream),
  by NumPy's ``SeedSequence``.
- :func:`utterance_epoch_rng`: the audio crop stream of one utterance in one epoch.
- :func:`annotator_rng`: the simulated annotators' stream for one utterance.
- :func:`kmeans_restart_seed`: the seed of restart ``i`` of ``n_init`` k-means runs.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SEED_MASK_63 = 2**63 - 1
_UINT32 = 0xFFFFFFFF
_UINT64 = 0xFFFFFFFFFFFFFFFF


def _blake2b_int(text: str, digest_size: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=digest_size).digest(), "little"
    )


def blake2b_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, epoch, utt_id, ...) that does not depend on the process."""
    return _blake2b_int("\x1f".join(map(str, parts)), 8) & _SEED_MASK_63


def seedsequence_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. run seed, worker rank, step, stream)."""
    state = np.random.SeedSequence([int(k) & _UINT64 for k in keys])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def utterance_epoch_rng(seed: int, epoch: int | None, utt_id: str) -> np.random.Generator:
    """The random stream for one utterance in one epoch: same inputs, same crop, on any worker.

    ``epoch=None`` gives fresh OS entropy (different every time, not reproducible).
    """
    if epoch is None:
        return np.random.default_rng()
    key = _blake2b_int(utt_id, 8)
    return np.random.default_rng([int(seed) & _UINT32, int(epoch) & _UINT32, key])


def annotator_rng(seed: int, utt_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, utt_id): stable across batches and processes."""
    return np.random.default_rng(_blake2b_int(f"{int(seed)}\x1f{utt_id}", 16))


def kmeans_restart_seed(seed: int, n_init: int, restart: int) -> int:
    """Seed of restart ``restart`` of ``n_init`` runs: disjoint for different ``seed``s."""
    return (seed * n_init + restart) % 2**31
