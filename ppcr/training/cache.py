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
    """image_key -> (C, s, s) embedding; an in-memory LRU bounded in bytes in front of a folder of safetensors files.

    `dtype`: how embeddings are stored, on disk and in memory (float16 halves both: 2.1 MB per image at SAM ViT-H's
    256 x 64 x 64 instead of 4.2 MB); they are returned in float32. float16 gets a folder of its own, so the two
    never mix."""

    def __init__(self, root: str | Path | None, encoder_fingerprint: str, max_memory_bytes: int = 2 * 2**30,
                 dtype: torch.dtype = torch.float32):
        name = encoder_fingerprint if dtype == torch.float32 else f"{encoder_fingerprint}-{str(dtype).split('.')[-1]}"
        self.dir = None if root is None else Path(root) / name
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_bytes = 0
        self.max_memory_bytes = max_memory_bytes
        self.dtype = dtype
        self.hits = self.misses = 0

    @staticmethod
    def bytes_per_image(prompt_embed_dim: int, embedding_size: int, dtype: torch.dtype = torch.float32) -> int:
        """The bytes one image's embedding takes: C x s x s values of `dtype`."""
        return prompt_embed_dim * embedding_size ** 2 * torch.finfo(dtype).bits // 8

    def describe(self, n_images: int, bytes_per_image: int) -> str:
        """One line for the log before training: what the cache will hold on disk and at most in memory."""
        where = "memory only" if self.dir is None else str(self.dir)
        total = n_images * bytes_per_image
        return (f"SAM embedding cache: {n_images:,} images x {bytes_per_image / 2**20:.2f} MiB "
                f"({str(self.dtype).split('.')[-1]}) = {total / 2**30:.2f} GiB on disk ({where}); at most "
                f"{min(total, self.max_memory_bytes) / 2**30:.2f} GiB in memory")

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.safetensors"

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key].float()
        if self.dir is not None and self._path(key).is_file():
            value = load_file(str(self._path(key)))["embedding"]
            self._remember(key, value)
            self.hits += 1
            return value.float()
        self.misses += 1
        raise KeyError(key)

    def get(self, key: str, default=None):  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().cpu().to(self.dtype).contiguous()
        self._remember(key, value)
        if self.dir is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"embedding": value}, str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a file

    def _remember(self, key: str, value: torch.Tensor) -> None:
        if key in self.memory:
            self.memory_bytes -= self._nbytes(self.memory.pop(key))
        self.memory[key] = value
        self.memory_bytes += self._nbytes(value)
        while self.memory_bytes > self.max_memory_bytes and len(self.memory) > 1:
            self.memory_bytes -= self._nbytes(self.memory.popitem(last=False)[1])

    @staticmethod
    def _nbytes(value: torch.Tensor) -> int:
        return value.numel() * value.element_size()

    def __delitem__(self, key: str) -> None:
        if key in self.memory:
            self.memory_bytes -= self._nbytes(self.memory.pop(key))
        if self.dir is not None and self._path(key).is_file():
            self._path(key).unlink()

    def __iter__(self) -> Iterator[str]:
        if self.dir is None:
            return iter(list(self.memory))
        return iter(sorted({p.stem for p in self.dir.glob("*/*.safetensors")} | set(self.memory)))

    def __len__(self) -> int:
        return sum(1 for _ in self)
