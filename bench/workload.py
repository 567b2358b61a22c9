"""What the load generator sends: gRPC-framed request bodies and a Zipf key mix.

h2load posts one file per process, so a gRPC body is pre-encoded here: the
5-byte gRPC message prefix (compressed flag 0, big-endian length) followed by
the protobuf bytes. Through Envoy the key travels in the query string (`?k=`)
of a URI list that h2load walks in order; the bench Envoy config copies it into
the x-api-key header before ext_authz runs (see bench/envoy_config.py).
"""

from __future__ import annotations

import bisect
import itertools
import random
import struct
from collections.abc import Sequence
from typing import Final

from sidecar.gen.tollway.v1 import tollway_pb2 as pb

__all__ = [
    "AUTHORIZE_PATH",
    "BENCH_METHOD",
    "BENCH_PATH",
    "GRPC_HEADERS",
    "ZipfSampler",
    "authorize_body",
    "envoy_uris",
    "grpc_frame",
    "parse_grpc_frames",
]

AUTHORIZE_PATH: Final = "/tollway.v1.Tollway/Authorize"
GRPC_HEADERS: Final = ("content-type: application/grpc", "te: trailers")
BENCH_METHOD: Final = "GET"
BENCH_PATH: Final = "/v1/search"
_PREFIX: Final = struct.Struct(">BI")  # compressed flag, message length


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return _PREFIX.pack(0, len(message)) + message


def parse_grpc_frames(data: bytes) -> list[bytes]:
    """The messages in a stream of length-prefixed gRPC messages (uncompressed only)."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _PREFIX.size:
            raise ValueError(f"truncated gRPC prefix at byte {offset}")
        flag, length = _PREFIX.unpack_from(data, offset)
        if flag != 0:
            raise ValueError(f"compressed gRPC message at byte {offset}")
        offset += _PREFIX.size
        if len(data) - offset < length:
            raise ValueError(f"truncated gRPC message at byte {offset}: want {length}")
        messages.append(data[offset : offset + length])
        offset += length
    return messages


def authorize_body(api_key: str, *, method: str = BENCH_METHOD, path: str = BENCH_PATH) -> bytes:
    """A framed tollway.v1.AuthorizeRequest, ready for `h2load -d`."""
    request = pb.AuthorizeRequest(api_key=api_key, method=method, path=path)
    return grpc_frame(request.SerializeToString())


def envoy_uris(base: str, api_keys: Sequence[str], order: Sequence[int]) -> list[str]:
    """URIs for `h2load -i`: one per request, the key of each in `?k=`."""
    return [f"{base}{BENCH_PATH}?k={api_keys[i]}" for i in order]


class ZipfSampler:
    """Ranks 0..n-1 drawn with P(rank k) proportional to 1 / (k + 1) ** s.

    Rank 0 is the busiest key. Seeded, so a run's key mix is reproducible.
    """

    def __init__(self, n: int, s: float = 1.1, *, seed: int = 5) -> None:
        if n < 1 or s <= 0:
            raise ValueError("ZipfSampler: need n >= 1 and s > 0")
        self.n = n
        self.s = s
        self._cumulative = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))
        self._random = random.Random(seed)

    def probability(self, rank: int) -> float:
        low = self._cumulative[rank - 1] if rank else 0.0
        return float((self._cumulative[rank] - low) / self._cumulative[-1])

    def sample(self, count: int) -> list[int]:
        total = self._cumulative[-1]
        draw = self._random.random
        return [
            min(bisect.bisect_left(self._cumulative, draw() * total), self.n - 1)
            for _ in range(count)
        ]

    def distinct(self, count: int) -> list[int]:
        """count different ranks, drawn by popularity (busiest usually first)."""
        if count > self.n:
            raise ValueError(f"ZipfSampler: cannot draw {count} distinct ranks of {self.n}")
        chosen: dict[int, None] = {}
        while len(chosen) < count:
            for rank in self.sample(count):
                chosen.setdefault(rank, None)
                if len(chosen) == count:
                    break
        return list(chosen)
