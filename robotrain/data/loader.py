"""How batches reach the training loop.

- Each batch is read with one vectorized `dataset.get_batch(indices)` call (array indexing,
  cached image decodes) rather than one `__getitem__` per sample plus a collate.
- The indices come from a batch sampler (`GlobalBatchSampler`): the order never depends on
  how batches are produced, so results are the same for any `num_workers` or prefetch depth.
- With `num_workers=0`, a background thread keeps `prefetch` batches ready, so the loop does
  not wait for data while the model computes (numpy and torch release the GIL for their work).
  With workers, the DataLoader's own `prefetch_factor` does that.
- The batch sampler never ends (it walks epoch after epoch), so the loader is iterated once per
  run: DataLoader workers, and the video decoders each keeps open, persist across epochs.
- Camera frames (image or video) travel as uint8 — 4x less than float32 between worker
  processes and to the device — and become float32 in [0, 1] on the training device
  (`to_device`), with the same division LeRobot does on the CPU, so the values are identical.
"""

from __future__ import annotations

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
                seed: int) -> DataLoader:
    return DataLoader(
        _Batches(dataset),
        sampler=batch_sampler,
        batch_size=None,  # the sampler yields whole batches; get_batch builds them
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader off the global RNG
    )


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


def batches(loader: DataLoader, prefetch: int) -> Iterator[dict[str, Any]]:
    """An iterator over `loader`, prefetched on a thread when the loader has no workers."""
    if loader.num_workers == 0 and prefetch > 0:
        return Prefetcher(_checked(iter(loader)), prefetch)
    return _checked(iter(loader))


def _checked(source: Iterator[Any]) -> Iterator[dict[str, Any]]:
    for batch in source:
        if isinstance(batch, _Failed):
            raise UserError(batch.message)
        yield batch
