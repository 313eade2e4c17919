"""Training on several LeRobot datasets at once: a weighted, deterministic, seekable mixture.

Order
    Global positions are cut into blocks of `block_size` slots. Member `k` owns `quota[k]` slots
    of every block (`quota[k] / block_size == weight[k] / sum(weights)`, exactly when the weights'
    ratios have a common denominator up to 2^20 — 2.0 and 1.0 give thirds —, else to within
    1/2^20 by largest remainders, each member keeping at least one slot). Inside a block a keyed
    Feistel permutation (`robotrain.data.sampler.feistel_permute`, keyed by the run's seed and
    the block) shuffles which slot a position lands on; the slot names the member and its next
    position in that member's own `EpisodeAwareSampler` stream (block `b`, slot `j` of member
    `k` -> its stream position `b * quota[k] + j`). So every block supplies each member exactly
    its share, each member walks its own episode-aware order epoch after epoch (a small member
    with a large weight repeats sooner), and the frame at a position is a pure function of
    (seed, position, the members and their weights): O(1) seek, memory O(members + episodes),
    and resume is sample-exact at any number of processes, as for one dataset.

Features
    A member's features are renamed as it is read (`dataset.rename_map`, then the member's own
    `rename_map`). The features the policy uses — `policy.input_features`/`output_features`,
    else those of the first member — must be in every member with the same shape (a camera may
    differ in size for a policy that resizes its images itself: it is resized so in the loader);
    a feature the policy does not use is kept only when every member has it alike. Each member's action chunk
    and observation history use its own fps. Normalization stats are LeRobot's
    `aggregate_stats` over the members: count-weighted means and variances, min of mins, max of
    maxes — the stats of the concatenated frames, not weighted by the mixture's weights (the
    weights change how often a frame is seen, not what the data is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import torch

from robotrain.data.metadata import CAMERA_DTYPES, DatasetMeta
from robotrain.data.sampler import EpisodeAwareSampler, derived_seed, feistel_half_bits, feistel_keys, \
    feistel_permute
from robotrain.data.statistics import aggregate_stats
from robotrain.errors import UserError
from robotrain.policies.base import resize_with_pad

#: A block of slots holds each member's exact share when the weights' ratios have a common
#: denominator up to this size; otherwise the shares are rounded to this resolution.
MAX_BLOCK = 1 << 20
#: Blocks are made at least this long (the exact block repeated), so that a batch spans few
#: blocks and the members' slots are shuffled over a good stretch of the run.
MIN_BLOCK = 1 << 12
STATE_VERSION = 1
#: The batch key naming each sample's member (its position in dataset.datasets).
MEMBER_KEY = "member"


def block_quotas(weights: Sequence[float]) -> list[int]:
    """Each member's slots in a block, in proportion to `weights` (see the module docstring)."""
    shares = [Fraction(repr(float(w))) for w in weights]
    total = sum(shares)
    exact = [s / total for s in shares]
    block = math.lcm(*(f.denominator for f in exact))
    if block <= MAX_BLOCK:
        if len(weights) > 1:
            block *= max(1, -(-MIN_BLOCK // block))
        return [int(f * block) for f in exact]
    raw = [f * MAX_BLOCK for f in exact]
    quotas = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: (raw[k] - math.floor(raw[k]), -k), reverse=True)
    for k in by_remainder[: max(0, MAX_BLOCK - sum(quotas))]:
        quotas[k] += 1
    while sum(quotas) > MAX_BLOCK:  # members raised to one slot: take it from the largest
        quotas[quotas.index(max(quotas))] -= 1
    return quotas


class MixtureSampler:
    """Frame indices (in the members' concatenated index space) at global positions, drawn from
    the members by weight. Same interface as `EpisodeAwareSampler` for `GlobalBatchSampler` and
    `DataPosition`: `frames_at`, `seek`, `state_dict`, `check_state_dict`, `load_state_dict`."""

    def __init__(self, members: Sequence[EpisodeAwareSampler], weights: Sequence[float], offsets: Sequence[int],
                 *, seed: int = 0, shuffle: bool = True):
        """`members`: each member's sampler over its own frames; `offsets`: each member's first
        index in the concatenated space."""
        if not members or len(members) != len(weights) or len(members) != len(offsets):
            raise ValueError("one weight and one offset per member, and at least one member")
        self.members, self.weights = list(members), [float(w) for w in weights]
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.seed, self.shuffle = seed, shuffle
        self.quotas = np.asarray(block_quotas(self.weights), dtype=np.int64)
        self.block_size = int(self.quotas.sum())
        self._slot_end = np.cumsum(self.quotas)
        self._block_seed = derived_seed(seed, "mixture blocks")
        self._keys: dict[int, np.ndarray] = {}
        self._member_key_cache: dict[tuple[int, int], np.ndarray] = {}
        self._sizes = np.array([m.num_samples for m in self.members], dtype=np.int64)
        self._feistel = np.array([m.shuffle and m.permutation == "feistel" for m in self.members])
        self._half_bits = np.array([feistel_half_bits(m.num_samples) for m in self.members], dtype=np.int64)
        self._position = 0

    @property
    def num_samples(self) -> int:
        """Valid frames over all members (what one pass over every member would draw)."""
        return sum(m.num_samples for m in self.members)

    def members_at(self, positions: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(member, position in that member's own stream) at each global position."""
        pos = np.asarray(positions, dtype=np.int64)
        blocks, slots = np.divmod(pos, self.block_size)
        if self.shuffle and self.block_size > 1:
            slots = slots.copy()
            for block in np.unique(blocks).tolist():
                mask = blocks == block
                slots[mask] = feistel_permute(slots[mask], self.block_size, self._block_keys(block))
        member = np.searchsorted(self._slot_end, slots, side="right")
        first_slot = self._slot_end[member] - self.quotas[member]
        return member, blocks * self.quotas[member] + (slots - first_slot)

    def frames_at(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Frame indices (concatenated space) at the given global positions."""
        member, stream = self.members_at(positions)
        epoch, offset = np.divmod(stream, self._sizes[member])
        valid = offset.copy()
        # Feistel members are permuted in one vectorized pass (a batch touches many members:
        # one call per member would cost more than the draws); randperm members one by one.
        feistel = self._feistel[member]
        if feistel.any():
            keys = self._member_keys(member[feistel], epoch[feistel])
            valid[feistel] = feistel_permute(offset[feistel], self._sizes[member[feistel]], keys,
                                             self._half_bits[member[feistel]])
        frames = np.empty_like(stream)
        for k in np.unique(member).tolist():
            mask = member == k
            if not self._feistel[k]:
                for e in np.unique(epoch[mask]).tolist():  # ascending: a cached randperm ends on the newest
                    rows = mask & (epoch == e)
                    valid[rows] = self.members[k].permute(e, offset[rows])
            frames[mask] = self.offsets[k] + self.members[k].valid_to_frames(valid[mask])
        return frames

    def _member_keys(self, member: np.ndarray, epoch: np.ndarray) -> np.ndarray:
        """Feistel round keys (rounds, len(member)) of each (member, epoch)."""
        pairs, inverse = np.unique(np.stack([member, epoch]), axis=1, return_inverse=True)
        if len(self._member_key_cache) > 4096:  # a run moves forward: forget epochs behind it
            self._member_key_cache.clear()
        table = []
        for k, e in pairs.T.tolist():
            if (k, e) not in self._member_key_cache:
                self._member_key_cache[(k, e)] = feistel_keys(self.members[k].seed, e)
            table.append(self._member_key_cache[(k, e)])
        return np.stack(table, axis=1)[:, inverse.reshape(-1)]

    def _block_keys(self, block: int) -> np.ndarray:
        if block not in self._keys:
            if len(self._keys) > 64:  # a run moves forward: forget blocks behind it
                self._keys.clear()
            self._keys[block] = feistel_keys(self._block_seed, block)
        return self._keys[block]

    def seek(self, position: int) -> None:
        self._position = int(position)

    def state_dict(self) -> dict[str, Any]:
        """JSON: the mixture it depends on (members, weights, quotas) and the position in it."""
        return {
            "version": STATE_VERSION, "kind": "mixture", "seed": self.seed, "shuffle": self.shuffle,
            "position": self._position, "weights": self.weights, "quotas": self.quotas.tolist(),
            "members": [_member_state(m) for m in self.members],
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse (one line) a state saved for another mixture, or for one dataset."""
        if state.get("kind") != "mixture":
            raise UserError("the checkpoint's data position is in one dataset but this run reads a mixture: resume "
                            "with the checkpoint's dataset settings, or pass resume.allow_changes=true")
        mine = self.state_dict()
        for key in ("version", "seed", "shuffle", "weights", "quotas", "members"):
            if state.get(key) != mine[key]:
                raise UserError(f"the checkpoint's mixture differs from this run's in its {key}: resume with the "
                                "same dataset.datasets and sampler settings, or pass resume.allow_changes=true")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._position = int(state["position"])


def _member_state(sampler: EpisodeAwareSampler) -> dict[str, Any]:
    """What a member's order depends on (its position lives in the mixture's)."""
    return {k: v for k, v in sampler.state_dict().items() if k not in ("epoch", "position")}


@dataclass
class Member:
    """One mixture member as read: its own metadata, and its features' names as the run sees them."""

    name: str
    """How errors name it: `dataset.datasets[<k>] (<repo_id>)`."""
    meta: DatasetMeta
    renames: dict[str, str]
    """{name in the dataset: name in the run}."""

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return {self.renames.get(k, k): v for k, v in self.meta.features.items()}

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        return {self.renames.get(k, k): v for k, v in self.meta.stats.items()}

    def original(self, name: str) -> str:
        """The dataset's own name of the run's feature `name`."""
        return next((old for old, new in self.renames.items() if new == name), name)

    @classmethod
    def of(cls, name: str, meta: DatasetMeta, renames: dict[str, str]) -> "Member":
        """Check that `renames` fits the dataset: no rename onto a feature it keeps under its own name."""
        applied = {old: new for old, new in renames.items() if old in meta.features and old != new}
        for old, new in applied.items():
            if new in meta.features and new not in applied:
                raise UserError(f"{name}: renaming {old!r} to {new!r} collides with its own feature {new!r}; "
                                f"rename {new!r} too, or pick another name")
        return cls(name, meta, applied)


@dataclass
class MixtureMeta:
    """What training reads of a mixture's metadata: its features and stats as the run names them."""

    features: dict[str, dict[str, Any]]
    stats: dict[str, dict[str, np.ndarray]]
    fps: int
    """The first member's (each member reads its chunks at its own fps)."""

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] in CAMERA_DTYPES]


def common_features(members: Sequence[Member], needed: Sequence[str],
                    resize: tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """The run's features: every `needed` one (the policy's), checked in each member; and the
    others that every member has alike. With `resize` (the policy's (width, height), see
    `PolicyConfig.image_resize`), a camera may differ in size between members: it is read at that
    size (`cameras_to_resize`)."""
    first = members[0].features
    features = {key: ft for key, ft in first.items()
                if key in needed or all(_alike(m.features.get(key), ft) for m in members)}
    for key in needed:
        for member in members:
            feature = member.features.get(key)
            if feature is None:
                raise UserError(f"{member.name} has no feature {key!r}, which the policy uses (it has "
                                f"{', '.join(sorted(member.features))}); map one of them to it with its rename_map, or "
                                "leave it out of policy.input_features")
            reference = first[key]
            if list(feature["shape"]) == list(reference["shape"]):
                continue
            if resize is not None and _is_camera(feature) and _is_camera(reference) \
                    and feature["shape"][-1] == reference["shape"][-1]:
                width, height = resize
                features[key] = {**reference, "shape": [height, width, reference["shape"][-1]]}
                continue
            raise UserError(f"{member.name} has {key!r} of shape {list(feature['shape'])} but "
                            f"{members[0].name} has {list(reference['shape'])}: members must agree on the "
                            "policy's features (rename another feature to it, or leave the member out; cameras "
                            "may differ in size for a policy that resizes its images, such as smolvla)")
    return features


def cameras_to_resize(members: Sequence[Member], features: dict[str, dict[str, Any]]) -> list[frozenset[str]]:
    """For each member, the cameras (the run's names) that it holds at another size than the run's."""
    return [frozenset(key for key, ft in features.items() if _is_camera(ft) and key in member.features
                      and list(member.features[key]["shape"]) != list(ft["shape"])) for member in members]


def _is_camera(feature: dict[str, Any]) -> bool:
    return feature["dtype"] in CAMERA_DTYPES


def _alike(a: dict | None, b: dict) -> bool:
    return a is not None and list(a["shape"]) == list(b["shape"]) and a["dtype"] == b["dtype"]


def mixture_meta(members: Sequence[Member], features: dict[str, dict[str, Any]]) -> MixtureMeta:
    stats = aggregate_stats([{k: v for k, v in m.stats.items() if k in features} for m in members])
    return MixtureMeta(features=features, stats=stats, fps=members[0].meta.fps)


class MixtureDataset:
    """The members' frames in one index space (member `k` from `offsets[k]` on), read as the
    run names them; each batch also says which member each sample came from (`member`)."""

    def __init__(self, datasets: Sequence[Any], members: Sequence[Member], meta: MixtureMeta):
        self.datasets, self.members, self.meta = list(datasets), list(members), meta
        self.resized = cameras_to_resize(self.members, meta.features)
        sizes = [len(d) for d in self.datasets]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._len = int(sum(sizes))
        self._key_names: list[dict[str, str | None]] = [{} for _ in self.datasets]

    def __len__(self) -> int:
        return self._len

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.meta.features

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Frames at `indices` (concatenated space), one `get_batch` per member they fall in, in
        the order asked."""
        idx = np.asarray(indices, dtype=np.int64)
        member = np.searchsorted(self.offsets, idx, side="right") - 1
        by_member = np.argsort(member, kind="stable")
        ends = np.cumsum(np.bincount(member, minlength=len(self.datasets)))
        parts, start = [], 0
        for k, end in enumerate(ends.tolist()):
            if end > start:
                part = self.datasets[k].get_batch(idx[by_member[start:end]] - self.offsets[k])
                names = self._names(k, part)
                part = {names[key]: value for key, value in part.items() if names[key] is not None}
                for key in self.resized[k]:
                    part[key] = self._resize(key, part[key])
                parts.append(part)
            start = end
        # by_member[i] is the batch row of the i-th frame read; put each back in its row.
        order = None if len(parts) == 1 or np.all(by_member[1:] > by_member[:-1]) else np.argsort(by_member)
        batch = {key: _stitch([part[key] for part in parts], order) for key in parts[0]}
        batch[MEMBER_KEY] = torch.from_numpy(member)
        return batch

    def _resize(self, key: str, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (..., C, H, W) resized with padding to the run's size for `key`, as the
        policy itself would resize them (rounded back to uint8: within 1/510 of its float resize)."""
        height, width = self.meta.features[key]["shape"][:2]
        flat = frames.reshape(-1, *frames.shape[-3:]).float()
        resized = resize_with_pad(flat, width, height, pad_value=0).round_().clamp_(0, 255).to(torch.uint8)
        return resized.reshape(*frames.shape[:-3], *resized.shape[-3:])

    def _names(self, k: int, part: dict[str, Any]) -> dict[str, str | None]:
        """Member `k`'s batch keys -> the run's names (None: a feature the run does not keep)."""
        names = self._key_names[k]
        if names.keys() != part.keys():
            for key in part:
                pad = key.endswith("_is_pad")
                base = key[: -len("_is_pad")] if pad else key
                name = self.members[k].renames.get(base, base)
                keep = name in self.meta.features or key == "task"
                names[key] = (f"{name}_is_pad" if pad else name) if keep else None
        return names

def _stitch(values: list[Any], order: np.ndarray | None) -> Any:
    """Members' parts of one batch key, back in the batch's order (`order`: None, already is)."""
    if torch.is_tensor(values[0]):
        joined = values[0] if len(values) == 1 else torch.cat(values)
        # index_select: several times faster than advanced indexing on uint8 frames
        return joined if order is None else joined.index_select(0, torch.from_numpy(order))
    flat = [v for part in values for v in part]
    return flat if order is None else [flat[i] for i in order]
