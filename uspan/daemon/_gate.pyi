BATCH: int
BUFFER_SIZE: int

def read(
    fd: int, buffer: bytearray, rounds: int, limit: int, mac1_key: bytes, cookie_key: bytes,
    secret: bytes | None, under_load: bool, hand_up: int, cookies: int, lane: bytes, /,
) -> tuple[list[tuple[bytes, tuple[str, int] | tuple[str, int, int, int], bytes, int]],
           tuple[int, int, int, int, int, int]]: ...
def classify(data: bytes, source: bytes, mac1_key: bytes, secret: bytes | None,
             under_load: bool, /) -> int: ...
def cookie_reply(msg: bytes, source: bytes, secret: bytes, cookie_key: bytes, /) -> bytes: ...
