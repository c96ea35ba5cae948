from collections.abc import Sequence

def split(
    packet: bytes | bytearray | memoryview, ip_len: int, hdr_len: int, step: int, v6: bool,
    tcp: bool, /,
) -> list[bytes]: ...
def coalesce(packets: Sequence[bytes], udp: bool, /) -> list[tuple[bytes, bytes]]: ...
def batches(
    datagrams: Sequence[bytes], max_bytes: int, max_segments: int, /
) -> list[tuple[bytes, int]]: ...

UDP_MAX_SEGMENTS: int
