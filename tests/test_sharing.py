"""Large inputs cross to a worker process in shared memory: over a real socket pair and `Connection`, byte strings
of 64 KiB and more travel as memory-file descriptors, smaller ones inline, and the sender keeps no descriptor."""

from __future__ import annotations

import gc
import os
import socket
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from tests.helpers import png_bytes
from vlmbridge.engine import sharing
from vlmbridge.engine.types import ChatMessage, GenerationRequest, ImagePart, PixelBudget, TextPart
from vlmbridge.media.decode import decode_image

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this platform (inline there)")


Pair = tuple[socket.socket, Connection, socket.socket, Connection]


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = socket.socketpair()
    ends = (a, Connection(os.dup(a.fileno())), b, Connection(os.dup(b.fileno())))
    yield ends
    for end in ends:
        end.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if sys.platform == "linux" else 0


def test_a_picture_crosses_in_shared_memory_and_decodes_there(pair: Pair) -> None:
    front_sock, front, worker_sock, worker = pair
    big = decode_image(png_bytes(320, 240, seed=3))
    small = decode_image(png_bytes(32, 32, seed=4))
    request = GenerationRequest(
        messages=(
            ChatMessage(
                "user",
                (
                    ImagePart(big, PixelBudget(max_pixels=1 << 20)),
                    ImagePart(small, PixelBudget(max_pixels=1 << 20)),
                    TextPart("two"),
                ),
            ),
        ),
        request_id="r1",
    )
    before = open_fds()
    packed = sharing.pack(("generate", request))
    assert len(packed.fds) == 1 and packed.shared_bytes == big.nbytes > sharing.LARGE > small.nbytes
    assert len(packed.data) < sharing.LARGE  # the picture is not in the pickle
    sharing.send(front_sock, front, packed)
    packed.close()
    assert open_fds() == before  # the sender keeps nothing open once the message is on its way

    kind, got = sharing.receive(worker_sock, worker)
    assert kind == "generate"
    (big_got, small_got, _) = got.messages[0].content
    assert isinstance(big_got.image._data, memoryview) and isinstance(small_got.image._data, bytes)
    assert big_got.image.digest == big.digest and bytes(big_got.image._data) == bytes(big._data)
    # The worker decodes from the mapping: the same pixels as the front would get.
    assert big_got.image.image.tobytes() == big.image.tobytes()
    # The mapping holds the memory (and, before Python 3.13, a descriptor of its own) while the request needs it.
    del got, big_got, small_got
    gc.collect()
    assert open_fds() == before


def test_messages_without_large_bytes_go_inline_and_in_order(pair: Pair) -> None:
    front_sock, front, worker_sock, worker = pair
    blob = os.urandom(sharing.LARGE)
    for message in (("abort", "r1"), ("blob", blob), ("shutdown",)):
        sharing.send(front_sock, front, sharing.pack(message))
    assert sharing.receive(worker_sock, worker) == ("abort", "r1")
    kind, got = sharing.receive(worker_sock, worker)
    assert kind == "blob" and isinstance(got, memoryview) and bytes(got) == blob
    assert sharing.receive(worker_sock, worker) == ("shutdown",)
