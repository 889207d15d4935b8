"""The per-thread scratch memory of the acceleration layer (one owner for all of it).

The int8 blocks (:mod:`.int8_block`) keep their intermediate matrices here between the
kernel calls, and the kernel bindings (:mod:`.int8_kernels`) the per-thread rows their
LayerNorm kernels work in: fresh multi-megabyte buffers cost a page fault per 4 KB, as
much as the pass that fills them, so every buffer is reused by every block and call.
Imports nothing of the layer, so both of those modules can use it.
"""

from __future__ import annotations

import threading
from typing import Tuple

import torch


class Workspace(threading.local):
    """Scratch buffers by role, one set per thread, grown to the largest request seen.

    The views handed out are cached by (role, shape, dtype): a ViT forward asks ~100
    times, and slicing and viewing a tensor costs more Python time than a dict lookup.
    A view stays valid until the next request for the same role with a larger size."""

    def __init__(self):
        self.buffers = {}
        self.views = {}

    def get(self, role: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (role, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        numel = 1
        for size in shape:
            numel *= int(size)
        buf = self.buffers.get(role)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            with torch.inference_mode(False):    # a normal tensor: writable in and out of it
                buf = torch.empty(numel, dtype=dtype)
            self.buffers[role] = buf
            self.views = {k: v for k, v in self.views.items() if k[0] != role}
        with torch.inference_mode(False):
            view = buf[:numel].view(shape)
        self.views[key] = view
        return view

    def release(self) -> None:
        self.buffers.clear()
        self.views.clear()


WORKSPACE = Workspace()

__all__ = ["Workspace", "WORKSPACE"]
