"""Episode-aware, deterministic, seekable sampling of frame indices.

`EpisodeAwareSampler` draws frame indices from a LeRobot dataset given only its episode
boundaries (``episode_from[e]`` inclusive, ``episode_to[e]`` exclusive, global frame indices).
Optionally it drops the first ``drop_n_first_frames`` and the last ``drop_n_last_frames`` frames
of every episode, so that the valid frames of episode ``e`` are
``[episode_from[e] + drop_n_first_frames, episode_to[e] - drop_n_last_frames)``; an episode too
short to keep any frame contributes none.

It defines an infinite stream of *global positions* ``p = 0, 1, 2, ...`` over epochs: position
``p`` is offset ``p % num_samples`` of epoch ``p // num_samples``, and every epoch visits each
valid frame exactly once. The training loop consumes one global batch of consecutive positions
per optimizer step; `GlobalBatchSampler` hands rank ``r`` its share of that batch.

What is deterministic
    The frame at every global position is a pure function of: ``seed``, the epoch, the episode
    boundaries, the two drop counts, ``shuffle`` and ``permutation``. Nothing else enters it: it
    is the same for any ``num_workers``, any world size or rank, any process, and whether the
    stream was read from the start or after a seek / `load_state_dict`. Two fresh samplers with
    the same arguments yield the same order; a resumed run continues the exact order.

What is not
    Nothing else. The global torch / numpy / python RNGs are never read or advanced. One caveat
    across software versions: ``permutation="randperm"`` is ``torch.randperm`` under a seeded
    CPU generator, and torch does not promise that stream across releases; ``"feistel"`` is
    plain 64-bit integer arithmetic and gives the same order on every platform and version.

The two permutations
    ``"randperm"`` (default): a uniform permutation per epoch, ``O(num_samples)`` memory and time
    once per epoch (it is cached for the epoch in use). Valid index -> frame index is computed per
    draw, so the per-epoch cost is essentially the bare ``torch.randperm``.
    ``"feistel"``: a seeded 6-round Feistel network over a power-of-four domain with
    cycle-walking into ``[0, num_samples)``. ``O(1)`` memory and ``O(1)`` seek, for datasets too
    large to hold a permutation (it is a pseudo-random permutation, not a uniform one).

Memory: ``O(episodes)`` (cumulative valid counts), never ``O(frames)`` except the randperm
permutation itself.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from robotrain.errors import UserError

log = logging.getLogger("robotrain")

PERMUTATIONS = ("randperm", "feistel")
STATE_VERSION = 1

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_FEISTEL_ROUNDS = 6
# The domain is < 4 * num_samples, so a walk of length k has probability < (3/4)^k:
# reaching this bound means a bug, not bad luck.
_MAX_CYCLE_WALKS = 1000
# Frames produced per vectorized step of `__iter__`: large enough to amortise numpy calls,
# small enough that a huge epoch is never materialised.
_ITER_BLOCK = 4096


def _splitmix64(x: int) -> int:
    """One splitmix64 step on a python int (used for per-epoch keys and seeds)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finaliser on uint64 arrays (wrap-around multiply is intended)."""
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch; mixing twice keeps (seed, epoch) and (seed+1, epoch-1) apart."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) >> 1


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use of the run's seed (e.g. a mixture member's order), independent of
    the others: splitmix64 of the seed mixed with a stable hash of `purpose`."""
    salt = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    return _splitmix64((seed & _MASK64) ^ salt) >> 1


def feistel_half_bits(n: int) -> int:
    """Half-width h of the smallest domain 4^h >= n (h >= 1 so that n = 1 still has two halves)."""
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _feistel_encrypt(x: np.ndarray, keys: np.ndarray, half_bits: int | np.ndarray) -> np.ndarray:
    """A balanced Feistel network: a bijection of [0, 4**half_bits) for any round keys. `keys` is
    (rounds,), or (rounds, len(x)) with `half_bits` per element: many permutations in one pass."""
    shift = np.asarray(half_bits, dtype=np.uint64)
    mask = (np.uint64(1) << shift) - np.uint64(1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << shift) | right


def feistel_permute(offsets: np.ndarray, n: int | np.ndarray, keys: np.ndarray,
                    half_bits: np.ndarray | None = None) -> np.ndarray:
    """Map offsets in ``[0, n)`` through the keyed Feistel permutation of ``[0, n)``.

    Cycle-walking (re-encrypting values that land in ``[n, 4**h)``) restricts the bijection of
    the power-of-four domain to a bijection of ``[0, n)``. With `n` an array (one domain per
    offset), `keys` (rounds, len(offsets)) and `half_bits` (`feistel_half_bits` of each `n`),
    each offset goes through its own permutation.
    """
    per_element = np.ndim(n) > 0
    n = np.asarray(n, dtype=np.int64)
    if not per_element:
        half_bits = feistel_half_bits(int(n))
    bound = n.astype(np.uint64)
    out = _feistel_encrypt(np.asarray(offsets, dtype=np.uint64), keys, half_bits)
    pending = np.flatnonzero(out >= bound)
    walks = 0
    while pending.size:
        walks += 1
        if walks > _MAX_CYCLE_WALKS:
            raise RuntimeError(
                f"feistel cycle-walk exceeded {_MAX_CYCLE_WALKS} steps for n={n}; this is a bug"
            )
        if per_element:
            walked = _feistel_encrypt(out[pending], keys[:, pending], half_bits[pending])
            out[pending] = walked
            pending = pending[walked >= bound[pending]]
        else:
            walked = _feistel_encrypt(out[pending], keys, half_bits)
            out[pending] = walked
            pending = pending[walked >= bound]
    return out.astype(np.int64)


def feistel_keys(seed: int, epoch: int, rounds: int = _FEISTEL_ROUNDS) -> np.ndarray:
    """Round keys of the Feistel permutation for ``(seed, epoch)``."""
    base = _epoch_seed(seed, epoch)
    return np.array(
        [_splitmix64((base + r * _GOLDEN) & _MASK64) for r in range(rounds)], dtype=np.uint64
    )


def _as_boundaries(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 array from an array, sequence or CPU tensor of frame indices."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UserError(f"{name} must be a 1-D sequence of frame indices, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise UserError(f"{name} must hold integer frame indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_boundaries(start: np.ndarray, end: np.ndarray) -> None:
    """Refuse boundary arrays that cannot describe a dataset's episodes."""
    if start.shape != end.shape:
        raise UserError(
            f"episode_from has {start.size} entries but episode_to has {end.size}; "
            "pass one (from, to) pair per episode"
        )
    if start.size == 0:
        raise UserError("the dataset has no episodes; pass at least one (from, to) pair")
    if start.min() < 0 or bool(np.any(end < start)):
        raise UserError("episode boundaries must satisfy 0 <= episode_from <= episode_to")
    # Overlapping episodes would make some frames come twice per epoch.
    s, e = start, end
    if np.count_nonzero(end > start) != start.size:
        nonempty = np.flatnonzero(end > start)
        s, e = start[nonempty], end[nonempty]
    if s.size > 1 and bool(np.any(s[1:] < s[:-1])):
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
    if s.size > 1 and bool(np.any(s[1:] < e[:-1])):
        raise UserError("episodes overlap; pass disjoint [episode_from, episode_to) ranges")


def _check_int(value: Any, name: str, minimum: int | None = 0) -> int:
    try:
        as_int = operator.index(value)
    except TypeError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and as_int < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


class EpisodeAwareSampler(Sampler[int]):
    """Deterministic, seekable sampler over the valid frames of a set of episodes.

    See the module docstring for the exact determinism contract. ``len(sampler)`` is the number
    of valid frames per epoch. Iterating yields the current epoch from the current position to
    its end and then moves to the next epoch (so a loop without `set_epoch` still reshuffles).
    The training loop should prefer `frames_at` / `GlobalBatchSampler`, which address global
    positions directly and keep no iteration state.
    """

    def __init__(
        self,
        episode_from: Sequence[int] | np.ndarray | torch.Tensor,
        episode_to: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        seed: int = 0,
        shuffle: bool = True,
        permutation: str = "randperm",
        drop_n_first_frames: int = 0,
        drop_n_last_frames: int = 0,
    ):
        super().__init__()
        if permutation not in PERMUTATIONS:
            raise UserError(
                f"unknown sampler permutation {permutation!r}; use one of {', '.join(PERMUTATIONS)}"
            )
        self.seed = _check_int(seed, "sampler seed", minimum=None)
        self.shuffle = bool(shuffle)
        self.permutation = permutation
        self.drop_n_first_frames = _check_int(drop_n_first_frames, "drop_n_first_frames")
        self.drop_n_last_frames = _check_int(drop_n_last_frames, "drop_n_last_frames")
        start = _as_boundaries(episode_from, "episode_from")
        end = _as_boundaries(episode_to, "episode_to")
        _check_boundaries(start, end)
        self.num_episodes = int(start.size)
        self._index_valid_frames(start, end)
        self._epoch = 0
        self._offset = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._keys_epoch: int | None = None
        self._keys: np.ndarray | None = None

    def _index_valid_frames(self, start: np.ndarray, end: np.ndarray) -> None:
        """Store cumulative valid counts and per-episode (frame - valid index) offsets."""
        # In-place arithmetic throughout: with millions of episodes every temporary counts.
        first = start + self.drop_n_first_frames
        lengths = end - first
        lengths -= self.drop_n_last_frames
        np.maximum(lengths, 0, out=lengths)
        if np.count_nonzero(lengths) != lengths.size:
            # Episodes with no valid frame would only tie in the search below.
            keep = np.flatnonzero(lengths)
            first, lengths = first[keep], lengths[keep]
        if lengths.size == 0:
            raise UserError(
                f"drop_n_first_frames={self.drop_n_first_frames} and "
                f"drop_n_last_frames={self.drop_n_last_frames} leave no frame in any episode; "
                "lower them"
            )
        cum_end = np.cumsum(lengths)
        self.num_samples = int(cum_end[-1])
        # frame = valid index + offset of its episode, where cum_end - lengths is the episode's
        # first valid index.
        np.subtract(cum_end, lengths, out=lengths)
        offsets = first
        offsets -= lengths
        del lengths
        if bool(np.all(offsets == offsets[0])):
            # Valid frames form one contiguous run: no per-draw search is needed.
            self._base_offset: int | None = int(offsets[0])
            self._cum_end: np.ndarray | None = None
            self._offsets: np.ndarray | None = None
        else:
            self._base_offset = None
            self._cum_end = cum_end
            self._offsets = offsets

    def __len__(self) -> int:
        return self.num_samples

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """The global position of the next frame `__iter__` would yield."""
        return self._epoch * self.num_samples + self._offset

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next `__iter__` walks; the same epoch keeps a restored position."""
        epoch = _check_int(epoch, "epoch")
        if epoch != self._epoch:
            self._epoch, self._offset = epoch, 0

    def seek(self, position: int) -> None:
        """Make the next `__iter__` start at global position ``position``."""
        position = _check_int(position, "sampler position")
        self._epoch, self._offset = divmod(position, self.num_samples)

    def frames_at(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Frame indices at the given global positions (any shape; may span epochs)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size == 0:
            return pos.copy()
        if int(pos.min()) < 0:
            raise ValueError("sampler positions must be >= 0")
        epochs, offsets = np.divmod(pos, self.num_samples)
        first_epoch, last_epoch = int(epochs.min()), int(epochs.max())
        if first_epoch == last_epoch:
            valid = self.permute(first_epoch, offsets)
        else:
            valid = np.empty_like(offsets)
            # Ascending, so a cached randperm ends on the latest epoch the caller moves into.
            for epoch in np.unique(epochs).tolist():
                mask = epochs == epoch
                valid[mask] = self.permute(epoch, offsets[mask])
        return self.valid_to_frames(valid)

    def frame_at(self, position: int) -> int:
        """The frame index at one global position."""
        return int(self.frames_at(np.array([position], dtype=np.int64))[0])

    def permute(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        """Offsets within ``epoch`` -> valid-frame indices in ``[0, num_samples)``."""
        if not self.shuffle:
            return offsets
        if self.permutation == "randperm":
            return self._randperm(epoch)[offsets]
        if self._keys_epoch != epoch:
            self._keys, self._keys_epoch = feistel_keys(self.seed, epoch), epoch
        return feistel_permute(offsets, self.num_samples, self._keys)

    def _randperm(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            # Free the old permutation first so two epochs never sit in memory at once.
            self._perm, self._perm_epoch = None, None
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_samples, generator=generator).numpy()
            self._perm_epoch = epoch
        return self._perm

    def valid_to_frames(self, valid: np.ndarray) -> np.ndarray:
        """Valid-frame indices in ``[0, num_samples)`` -> frame indices."""
        if self._base_offset is not None:
            return valid + self._base_offset
        episode = np.searchsorted(self._cum_end, valid, side="right")
        return valid + self._offsets[episode]

    def __iter__(self) -> Iterator[int]:
        epoch, offset, n = self._epoch, self._offset, self.num_samples
        while offset < n:
            stop = min(n, offset + _ITER_BLOCK)
            block = self.frames_at(np.arange(epoch * n + offset, epoch * n + stop))
            for frame in block.tolist():
                # Count before yielding: a state_dict taken after receiving a frame excludes it.
                offset += 1
                self._offset = offset
                yield frame
        self._epoch, self._offset = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the configuration it depends on and the position in it."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._offset,
            "permutation": self.permutation,
            "shuffle": self.shuffle,
            "drop_n_first_frames": self.drop_n_first_frames,
            "drop_n_last_frames": self.drop_n_last_frames,
            "num_samples": self.num_samples,
            "num_episodes": self.num_episodes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`; refuse state from a different sampler."""
        self.check_state_dict(state)
        self._epoch, self._offset = state["epoch"], state["position"]

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse (one line) a state saved by another sampler or for another dataset."""
        if state.get("kind") == "mixture":
            raise UserError("the checkpoint's data position is in a mixture of datasets but this run reads one "
                            "dataset: resume with the checkpoint's dataset.datasets, or pass resume.allow_changes=true")
        mine = self.state_dict()
        for key in ("version", "seed", "permutation", "shuffle", "drop_n_first_frames",
                    "drop_n_last_frames", "num_samples", "num_episodes"):
            if key not in state:
                raise UserError(f"sampler state lacks {key!r}; pass a state saved by state_dict()")
            if state[key] != mine[key]:
                raise UserError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={mine[key]!r}; resume with the same dataset and sampler settings"
                )
        _check_int(state.get("epoch"), "sampler state epoch")
        offset = _check_int(state.get("position"), "sampler state position")
        if offset > self.num_samples:
            raise UserError(
                f"sampler state position {offset} exceeds num_samples {self.num_samples}; "
                "the state does not belong to this dataset"
            )


class GlobalBatchSampler(Sampler[list[int]]):
    """Infinite batches for one rank, cut from consecutive global positions.

    Step ``k`` covers global positions ``[start_position + k*G, start_position + (k+1)*G)`` with
    ``G = batch_size * num_processes``; rank ``r`` takes the slice starting at ``r*batch_size``.
    All ranks together consume each global batch exactly once, with no overlap and no gap, and
    the frames depend only on the positions (see `EpisodeAwareSampler`), so resuming with
    ``start_position = position_after(steps)`` continues the same global order on any world
    size. Each `__iter__` starts again at ``start_position``.
    """

    def __init__(
        self,
        sampler: EpisodeAwareSampler,
        batch_size: int,
        *,
        num_processes: int = 1,
        rank: int = 0,
        start_position: int = 0,
    ):
        super().__init__()
        self.sampler = sampler
        self.batch_size = _check_int(batch_size, "batch_size", minimum=1)
        self.num_processes = _check_int(num_processes, "num_processes", minimum=1)
        self.rank = _check_int(rank, "rank")
        if self.rank >= self.num_processes:
            raise UserError(f"rank {self.rank} is out of range for {self.num_processes} processes")
        self.start_position = _check_int(start_position, "start_position")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def position_after(self, steps: int) -> int:
        """Global position of the first frame of step ``steps`` (where to resume after it)."""
        return self.start_position + _check_int(steps, "steps") * self.global_batch_size

    def positions(self, step: int) -> np.ndarray:
        """The global positions this rank draws at step ``step``."""
        first = self.position_after(step) + self.rank * self.batch_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> list[int]:
        """The frame indices this rank draws at step ``step``."""
        return self.sampler.frames_at(self.positions(step)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


class DataPosition:
    """Where a run stands in its data: the optimizer steps taken and the global sample position
    they imply, for any number of processes. A checkpoint part (see `robotrain.checkpoint`):
    training_step.json and sampler_state.json.

    The position after step `s` is the position this run started from plus `(s - start step)`
    global batches; a resumed run starts where its checkpoint stood, even if its global batch
    differs from the one that got there. `batches(rank)` is the only place that arithmetic
    lives (`GlobalBatchSampler.position_after`)."""

    def __init__(self, sampler: EpisodeAwareSampler, batch_size: int, num_processes: int = 1,
                 grad_accum_steps: int = 1, allow_changes: bool = False):
        """`batch_size`: per process and micro-batch; `grad_accum_steps` micro-batches make a step.
        `allow_changes`: resume without checking that the sampler and dataset are the saved ones."""
        self.sampler, self.batch_size, self.num_processes = sampler, batch_size, num_processes
        self.grad_accum_steps, self.allow_changes = grad_accum_steps, allow_changes
        self.step = 0
        self._start = (0, 0)  # (step, global sample position) this run started from

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, over all processes and micro-batches."""
        return self.batch_size * self.num_processes * self.grad_accum_steps

    def batches(self, rank: int) -> GlobalBatchSampler:
        """Rank `rank`'s (micro-)batches from where this run starts: micro-batch `j` of step `s`
        is the sampler's batch `s * grad_accum_steps + j`."""
        return GlobalBatchSampler(self.sampler, self.batch_size, num_processes=self.num_processes, rank=rank,
                                  start_position=self._start[1])

    @property
    def sample_position(self) -> int:
        """The global sample position after `step` steps."""
        return self.position_at(self.step)

    def position_at(self, step: int) -> int:
        """The global sample position of optimizer step `step`'s first sample."""
        return self.batches(0).position_after((step - self._start[0]) * self.grad_accum_steps)

    def rows(self, step: int, micro: int, rank: int) -> np.ndarray:
        """The global sample positions of micro-batch `micro` of step `step` on process `rank`."""
        first = self.position_at(step) + (micro * self.num_processes + rank) * self.batch_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        position = self.sample_position
        self.sampler.seek(position)
        training_step = {"step": self.step, "num_processes": self.num_processes, "batch_size": self.batch_size,
                         "global_batch_size": self.global_batch_size, "sample_position": position}
        if self.grad_accum_steps > 1:  # absent means 1 (checkpoints from before accumulation existed)
            training_step["grad_accum_steps"] = self.grad_accum_steps
        return {"training_step": training_step, "sampler": self.sampler.state_dict()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        if not self.allow_changes:
            self.sampler.check_state_dict(state["sampler"])  # refuses a changed dataset or sampler

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["training_step"]
        self.step = saved["step"]
        self._start = (saved["step"], saved["sample_position"])
        if not self.allow_changes:
            self.sampler.load_state_dict(state["sampler"])
        saved_global = saved.get("global_batch_size", self.global_batch_size)
        if saved_global != self.global_batch_size:
            before = _split(saved.get("num_processes", 1), saved.get("batch_size", saved_global),
                            saved.get("grad_accum_steps", 1), "processes x ")
            now = _split(self.num_processes, self.batch_size, self.grad_accum_steps)
            log.warning(
                "the global batch changes from %d (%s) to %d (%s): training continues at sample %d of the same "
                "order, but its batches (and so the weights) differ from the original run's",
                saved_global, before, self.global_batch_size, now, saved["sample_position"])


def _split(processes: int, batch_size: int, micro_batches: int, unit: str = "x ") -> str:
    """How a global batch is made: "2 processes x 8", "1 x 8 x 2 micro-batches"."""
    split = f"{processes} {unit}{batch_size}"
    return split + f" x {micro_batches} micro-batches" if micro_batches > 1 else split
