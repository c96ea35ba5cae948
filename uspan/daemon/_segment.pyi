from collections.abc import Sequence

def split(
    packet: bytes | bytearray | memoryview, ip_len: int, hdr_len: int, step: int, v6: bool,
    tcp: bool, /,
) -> list[bytes]: ...
def coalesce(packets: Sequence[bytes], udp: bool, /) -> list[tuple[bytes, bytes]]: ...
def cut(
    vnet: bytes, packet: bytes | bytearray | memoryview, mtu: int, headroom: int, stride: int,
    max_segments: int, /,
) -> tuple[bytes, list[tuple[int, int]]]: ...
def batches(
    datagrams: Sequence[bytes], max_bytes: int, max_segments: int, /
) -> list[tuple[bytes, int]]: ...
def split_gro(data: bytes | bytearray | memoryview, gso_size: int, /) -> list[bytes]: ...

UDP_MAX_SEGMENTS: int
