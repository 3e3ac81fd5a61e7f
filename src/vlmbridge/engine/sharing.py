"""Large inputs cross to the worker process in shared memory, not through the pipe.

A front→worker message is pickled here; every `bytes` object of `LARGE` bytes or more (an image's or a video's
source bytes) is written once into an anonymous memory file (`memfd_create`) and replaced in the pickle by its
index. The files' descriptors travel beside the message over the Unix socket (SCM_RIGHTS); the worker maps each one
read-only and hands the media code a memoryview of the mapping: no pickling of megabytes, no copies through the
socket's buffers. Nothing is named, so nothing can leak: the memory goes when the last side closes its mapping,
even after kill -9 of either process. Platforms without memfd (macOS) send the bytes inline, as before.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LARGE", "Packed", "pack", "receive", "send", "unpack"]

LARGE = 64 * 1024  # smaller payloads cost less inline than a descriptor round trip
_CAN_SHARE = hasattr(os, "memfd_create")
_MAX_FDS = 64  # bounded like everything else: a request carries at most a few dozen pictures and clips


@dataclass
class Packed:
    """A pickled message and the memory files its large byte strings went into."""

    data: bytes
    fds: list[int] = field(default_factory=list)
    shared_bytes: int = 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, packed: Packed) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._packed = packed

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not bytes or len(obj) < LARGE or len(self._packed.fds) >= _MAX_FDS:
            return None
        fd = os.memfd_create("vlmbridge-input", os.MFD_CLOEXEC)
        try:
            view = memoryview(obj)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            raise
        self._packed.fds.append(fd)
        self._packed.shared_bytes += len(obj)
        return ("memfd", len(self._packed.fds) - 1, len(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file)
        self._fds = fds

    def persistent_load(self, pid: Any) -> Any:
        kind, index, size = pid
        if kind != "memfd" or not 0 <= index < len(self._fds):
            raise pickle.UnpicklingError(f"unknown shared input {pid!r}")
        if size == 0:
            return b""
        # The memoryview keeps the mapping (and the memory) alive as long as the media needs it; we close our
        # descriptor at once (mmap keeps a duplicate of its own until it is unmapped).
        return memoryview(mmap.mmap(self._fds[index], size, prot=mmap.PROT_READ))


def pack(message: tuple[Any, ...]) -> Packed:
    """`message` pickled, its large byte strings in memory files (inline where the platform has none)."""
    packed = Packed(b"")
    buf = io.BytesIO()
    try:
        if _CAN_SHARE:
            _Pickler(buf, packed).dump(message)
        else:
            pickle.dump(message, buf, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        packed.close()
        raise
    packed.data = buf.getvalue()
    return packed


def unpack(data: bytes | memoryview, fds: list[int]) -> Any:
    """The message `pack` made; closes the descriptors (their mappings stay)."""
    try:
        return _Unpickler(io.BytesIO(data), fds).load()
    finally:
        for fd in fds:
            os.close(fd)


def send(sock: socket.socket, conn: Any, packed: Packed) -> None:
    """Write a packed message to the worker as one `Connection` frame (a byte that counts the memory files, then the
    pickle), then the files' descriptors on one byte of their own. The caller holds the send lock: they stay
    together."""
    conn.send_bytes(bytes([len(packed.fds)]) + packed.data)
    if packed.fds:
        socket.send_fds(sock, [b"\0"], packed.fds)


def receive(sock: socket.socket, conn: Any) -> Any:
    """Read one message `send` wrote (the worker's side)."""
    frame = conn.recv_bytes()
    fds: list[int] = []
    if count := frame[0]:
        _, fds, _, _ = socket.recv_fds(sock, 1, count)
        if len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise pickle.UnpicklingError(f"a message announced {count} shared inputs and brought {len(fds)}")
    return unpack(memoryview(frame)[1:], fds)
