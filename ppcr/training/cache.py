"""Content-hashed caches of pure computations.

SAM's image encoder is frozen after stage 0, so its embedding of an image is a pure function of (encoder weights,
image bytes). `SamEmbeddingCache` keys each embedding by the image's content hash inside a folder named by the
encoder's fingerprint, so one image's embedding is computed once and shared by all of its expressions, by every
variant and by every seed that uses the same encoder.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha1 over a module's parameter names, shapes and values (CPU copies; for frozen modules)."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class SamEmbeddingCache(MutableMapping):
    """image_key -> (C, s, s) embedding; an in-memory LRU in front of a folder of safetensors files."""

    def __init__(self, root: str | Path | None, encoder_fingerprint: str, max_in_memory: int = 4096):
        self.dir = None if root is None else Path(root) / encoder_fingerprint
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_in_memory = max_in_memory
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.safetensors"

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key]
        if self.dir is not None and self._path(key).is_file():
            value = load_file(str(self._path(key)))["embedding"]
            self._remember(key, value)
            self.hits += 1
            return value
        self.misses += 1
        raise KeyError(key)

    def get(self, key: str, default=None):  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().cpu().contiguous()
        self._remember(key, value)
        if self.dir is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"embedding": value}, str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a file

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.max_in_memory:
            self.memory.popitem(last=False)

    def __delitem__(self, key: str) -> None:
        self.memory.pop(key, None)
        if self.dir is not None and self._path(key).is_file():
            self._path(key).unlink()

    def __iter__(self) -> Iterator[str]:
        if self.dir is None:
            return iter(list(self.memory))
        return iter(sorted({p.stem for p in self.dir.glob("*/*.safetensors")} | set(self.memory)))

    def __len__(self) -> int:
        return sum(1 for _ in self)
