"""Host-to-device copies through pinned buffers that live as long as the
engine.

vLLM's ``async_tensor_h2d`` (and ``Tensor.pin_memory()``) pins a fresh host
tensor for every copy (from torch's caching host allocator: an allocation,
an event, a free per copy); a verify step made about ten such copies (the
trace of 2026-11-25 put ``pin_memory`` at 5 % of the device's idle time at
budget 128, batch 1). ``Staging`` packs a step's small host tensors into
one pinned buffer and copies it with one ``copy_(non_blocking=True)`` into
one device buffer, returning device views. Two slots alternate; before a
slot's host side is rewritten, the copy that last read it has completed
(an event: in practice long done, the round synchronises once per step for
the scheduler's drafts), and its device side is only rewritten by copies
queued after everything that read it (one stream).

One instance per consumer (the runner's step inputs, each metadata
builder's masks): a view ``to_device`` returns stays valid until that
instance's second next copy. On CPU the tensors are returned as copies
(no device copy needed).
"""

from __future__ import annotations

import torch


class Staging:

    def __init__(self, device: torch.device, slots: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slots = slots
        self.host: list[torch.Tensor | None] = [None] * slots
        self.dev: list[torch.Tensor | None] = [None] * slots
        self.events: list = [None] * slots
        self.i = 0
        self.copies = 0            # copies made (for tests)

    def _slot(self, n: int) -> int:
        i = self.i = (self.i + 1) % self.slots
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.host[i] is None or self.host[i].numel() < n:
            size = max(1024, 1 << (n - 1).bit_length())
            self.host[i] = torch.empty(size, dtype=torch.int64,
                                       pin_memory=True)
            self.dev[i] = torch.empty(size, dtype=torch.int64,
                                      device=self.device)
        return i

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Int64 device copies of the host ``tensors`` (any integer dtype,
        shapes kept), one host-to-device copy for all of them; the host
        never waits for the device (but see the class doc)."""
        flat = [t.reshape(-1).to(torch.int64) for t in tensors]
        if not self.cuda:
            return [f.view(t.shape).clone() for f, t in zip(flat, tensors)]
        n = sum(f.numel() for f in flat)
        i = self._slot(n)
        host, dev = self.host[i], self.dev[i]
        if flat:
            torch.cat(flat, out=host[:n])
        dev[:n].copy_(host[:n], non_blocking=True)
        ev = self.events[i] or torch.cuda.Event()
        ev.record()
        self.events[i] = ev
        self.copies += 1
        out, o = [], 0
        for f, t in zip(flat, tensors):
            out.append(dev[o:o + f.numel()].view(t.shape))
            o += f.numel()
        return out

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` (host ``src``, int64 ``dst`` on the device)
        through this staging buffer, without waiting for the device."""
        if not dst.is_cuda:
            dst.copy_(src)
            return
        n = src.numel()
        i = self._slot(n)
        host = self.host[i][:n].view(src.shape)
        host.copy_(src)
        dst.copy_(host, non_blocking=True)
        ev = self.events[i] or torch.cuda.Event()
        ev.record()
        self.events[i] = ev
        self.copies += 1
