"""How batches reach the training loop.

- Each optimizer step's samples are read with one vectorized `dataset.get_batch(indices)` call
  (array indexing, cached image decodes) rather than one `__getitem__` per sample plus a
  collate, and then split into the step's micro-batches (views): with gradient accumulation a
  step costs one read, not one per micro-batch. Every feature is computed row by row, so a
  micro-batch holds exactly what reading it alone would give.
- The indices come from a batch sampler (`GlobalBatchSampler`): the order never depends on
  how batches are produced, so results are the same for any `num_workers` or prefetch depth.
- With `num_workers=0`, a background thread keeps `prefetch` steps ready, so the loop does
  not wait for data while the model computes (numpy and torch release the GIL for their work).
  With workers, the DataLoader's own `prefetch_factor` does that.
- The batch sampler never ends (it walks epoch after epoch), so the loader is iterated once per
  run: DataLoader workers, and the video decoders each keeps open, persist across epochs.
- Camera frames (image or video) travel as uint8 — 4x less than float32 between worker
  processes and to the device — and become float32 in [0, 1] on the training device
  (`to_device`), with the same division LeRobot does on the CPU, so the values are identical.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from robotrain.errors import UserError


class _Batches(Dataset):
    """Maps one list of indices (one batch) to one ready batch."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> dict[str, Any] | _Failed:
        try:
            return self.dataset.get_batch(indices)
        except UserError as err:  # bad data found mid-run (a damaged video): crosses workers as a value
            return _Failed(str(err))


@dataclass
class _Failed:
    """A batch that could not be read. A DataLoader worker's exception would reach the loop as a
    multi-line RuntimeError with the worker's traceback; this keeps robotrain's one-line error."""

    message: str


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch on `device`, uint8 camera frames converted to float32 in [0, 1] there (the
    dataset returns no other uint8 feature: integers are int64, as in LeRobot)."""
    from robotrain.data.reading import to_float

    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            value = to_float(value) if value.dtype == torch.uint8 else value
        moved[key] = value
    return moved


def make_loader(dataset: Any, batch_sampler: Sampler[list[int]], *, num_workers: int, pin_memory: bool,
                seed: int, micro_batches: int = 1) -> DataLoader:
    """A loader whose every item is `micro_batches` consecutive batches of `batch_sampler`, read
    as one (split them with `batches`)."""
    return DataLoader(
        _Batches(dataset),
        sampler=_Joined(batch_sampler, micro_batches) if micro_batches > 1 else batch_sampler,
        batch_size=None,  # the sampler yields whole batches; get_batch builds them
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader off the global RNG
    )


class _Joined(Sampler[list[int]]):
    """`count` consecutive batches of `batch_sampler` as one list of indices."""

    def __init__(self, batch_sampler: Sampler[list[int]], count: int):
        super().__init__()
        self.batch_sampler, self.count = batch_sampler, count

    def __iter__(self) -> Iterator[list[int]]:
        source = iter(self.batch_sampler)
        for first in source:
            yield [index for batch in (first, *itertools.islice(source, self.count - 1)) for index in batch]


def split(batch: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """A batch cut into `count` equal batches along its first dimension (tensors as views)."""
    size = len(next(iter(batch.values()))) // count
    return [{key: value[i * size:(i + 1) * size] for key, value in batch.items()} for i in range(count)]


_END = object()


class Prefetcher:
    """Iterates `source` on a daemon thread, up to `depth` items ahead; an exception raised
    there is raised here, at the item where it happened. `close()` stops the thread."""

    def __init__(self, source: Iterator[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), name="robotrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer, raised in its thread
            self._put(err)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def batches(loader: DataLoader, prefetch: int, micro_batches: int = 1,
            device: torch.device | None = None) -> Iterator[list[dict[str, Any]]]:
    """An iterator over `loader`'s steps, each a list of `micro_batches` batches; prefetched
    `prefetch` steps ahead on a thread when the loader has no workers. For a CPU `device` the
    batches come out as `to_device` makes them, so that the read-ahead thread, not the
    training step, converts the camera frames to float32."""
    ready = _checked(iter(loader), micro_batches, device if device is not None and device.type == "cpu" else None)
    return Prefetcher(ready, prefetch) if loader.num_workers == 0 and prefetch > 0 else ready


def _checked(source: Iterator[Any], micro_batches: int, cpu: torch.device | None) -> Iterator[list[dict[str, Any]]]:
    for batch in source:
        if isinstance(batch, _Failed):
            raise UserError(batch.message)
        if cpu is not None:
            batch = to_device(batch, cpu)
        yield split(batch, micro_batches) if micro_batches > 1 else [batch]
