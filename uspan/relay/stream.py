"""Writing relay frames to a TCP stream: the one writer both ends use."""

from __future__ import annotations

import contextlib

import trio

from uspan.relay.frames import stream_frame

WRITE_BATCH = 64  # frames joined into one send


async def write_frames(stream: trio.abc.SendStream,
                       frames: trio.MemoryReceiveChannel[bytes]) -> None:
    """Send queued frames, length-prefixed, a batch per write, until the channel or the
    stream closes."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for frame in frames:
            batch = [frame]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(frames.receive_nowait())
                except trio.WouldBlock:
                    break
            await stream.send_all(b"".join(stream_frame(f) for f in batch))
