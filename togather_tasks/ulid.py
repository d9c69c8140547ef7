"""ULIDs (https://github.com/ulid/spec): 48-bit millisecond time + 80 random bits, Crockford
base32, 26 characters. IDs sort by creation time, which the state schema relies on (current id >
previous id). Monotonic within a process: two IDs in the same millisecond still increase.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")

_lock = threading.Lock()
_last: tuple[int, int] = (0, 0)


def encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(ALPHABET[rem])
    if value:
        raise ValueError(f"value too large for {length} base32 characters")
    return "".join(reversed(chars))


def decode_time_ms(ulid: str) -> int:
    """Milliseconds since the epoch embedded in a ULID (its first 10 characters)."""
    value = 0
    for ch in ulid[:10]:
        value = value * 32 + ALPHABET.index(ch)
    return value


def new_ulid(now_ms: int | None = None) -> str:
    global _last
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _lock:
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
            if rand >= 1 << 80:
                ms, rand = ms + 1, secrets.randbits(80)
        else:
            rand = secrets.randbits(80)
        _last = (ms, rand)
    return encode(ms, 10) + encode(rand, 16)


def new_id(prefix: str) -> str:
    """`dep_…` and `lock_…` identifiers of the state file."""
    return f"{prefix}_{new_ulid()}"
