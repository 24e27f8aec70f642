"""Every wire message of spectutor: token events (Kafka / embedded log), promotions and heartbeats
(Redis), dead letters. This module is the only place their bytes are defined.

T output tokens in the event, K top-k width, S verification steps, P prompt tokens.

Envelope (6 bytes, then the body):
    magic b"ST" | major u8 | minor u8 | kind u8 | codec u8 | body
The body is a msgpack map with string keys; arrays are little-endian bytes, byte-shuffled (byte
plane by byte plane, so the always-zero high bytes of token ids compress to nothing) and the whole
body is compressed by `codec` (zlib for token events, none for the small Redis messages).

Evolution rule (what `decode` enforces):
- A MINOR bump only adds optional fields. Old readers ignore fields they do not know; new readers
  give missing fields their defaults. So any minor of our major is read.
- A MAJOR bump is anything else (a field removed, renamed or retyped). A reader dead-letters a
  record whose major differs from its own (`DeadLetterReason.UNKNOWN_MAJOR`); it never crashes.

Log-probability precision: `topk_logprobs` travel as float16 by default (half the bytes of
float32). Values are clamped to [-65504, 0]; -inf stays -inf. The rounding error is at most
2^-11 relative, i.e. <= 0.004 nats for log-probs >= -8 and <= 0.016 nats down to -32, so the
teacher probabilities the trainer rebuilds are off by at most ~1.6% relative (exp(0.016) - 1),
below the noise of one sampled batch. `encode(..., logprobs_f32=True)` keeps full precision.

Size (bench/streams.py; 128 output + 128 prompt tokens, bench/results/streams-cpu.json): 37.6 bytes
per generated token with top-8 (4.8 KB per event), 120 with top-32 (15.4 KB); float32 log-probs
would make that 51 and 175. Most of it is the top-k log-probs and ids, which barely compress.
"""

from __future__ import annotations

import enum
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
import numpy as np

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

MAGIC = b"ST"
_HEADER = struct.Struct("<2sBBBB")  # magic, major, minor, kind, codec
HEADER_BYTES = _HEADER.size


class Kind(enum.IntEnum):
    """What a record's body is; travels in the envelope so a reader can route before parsing."""

    TOKEN_EVENT = 1
    PROMOTION = 2
    HEARTBEAT = 3
    DEAD_LETTER = 4


class Codec(enum.IntEnum):
    """Body compression. Only stdlib codecs, so every reader can open every record."""

    NONE = 0
    ZLIB = 1


class DeadLetterReason(str, enum.Enum):
    """Why a record went to the dead-letter topic instead of to the consumer's caller."""

    MALFORMED = "malformed"  # not our envelope, bad compression, bad msgpack, bad field types
    UNKNOWN_MAJOR = "unknown_major"  # written under a schema major this reader does not speak
    UNEXPECTED_KIND = "unexpected_kind"  # a valid message, but not a token event
    INVALID = "invalid"  # parsed, but violates an invariant (shapes, accepted > proposed, ...)


class SchemaError(ValueError):
    """A record that cannot be read; `reason` says which dead-letter bucket it belongs in."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ModelRef:
    """A model's registered name and version (the MLflow version string for drafters)."""

    name: str
    version: str


@dataclass(frozen=True)
class Sampling:
    """The request's sampling parameters, as moe.generate.SamplingParams has them."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: int = 128
    seed: int | None = None


def _frozen_array(values: Any, dtype: np.dtype | type, ndim: int, name: str) -> np.ndarray:
    # A private read-only copy: the engine may reuse its buffers after handing us the event.
    arr = np.array(values, dtype=dtype, copy=True)
    if arr.size == 0 and arr.ndim != ndim:  # [] for "none": give it the right rank
        arr = arr.reshape((0,) * ndim)
    if arr.ndim != ndim:
        raise SchemaError(DeadLetterReason.INVALID, f"{name} must be {ndim}-d, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class TokenEvent:
    """One finished request (or one chunk of a very long one): what distillation needs.

    Steps: entry s is one verification step of this sequence; it emitted step_accepted[s] + 1
    tokens except where the request ended inside it (EOS, max_new_tokens).
    Chunks: a long request may be sent as chunks 0, 1, ... (same request_id, so the same Kafka key
    and partition, hence in order); `output_offset` is the position of output_ids[0] in the whole
    output, only chunk 0 carries the prompt, the last chunk has final=True and the finish_reason.
    `join_chunks` rebuilds the whole request.
    """

    request_id: str  # the Kafka key: all chunks of a request land on one partition, in order
    replica_id: str  # which serving replica produced it
    target: ModelRef  # the verifying (teacher) model
    drafters: tuple[ModelRef, ...]  # distinct drafter versions that served it (hot swaps add rows)
    prompt_ids: np.ndarray  # [P] int32
    output_ids: np.ndarray  # [T] int32
    step_proposed: np.ndarray  # [S] int32: draft tokens the target verified for this sequence
    step_accepted: np.ndarray  # [S] int32: accepted draft tokens (bonus token not counted)
    step_drafter: np.ndarray  # [S] int32: index into `drafters`
    topk_ids: np.ndarray  # [T, K] int32: target's top-k token ids at each output position
    topk_logprobs: np.ndarray  # [T, K] float32: their log-probabilities (float16 on the wire)
    sampling: Sampling = field(default_factory=Sampling)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; None before final
    domain: str | None = None  # traffic label ("chat", "code", ...) for per-domain acceptance
    ttft_s: float | None = None  # time to first token
    total_s: float | None = None  # request wall time
    chunk: int = 0  # chunk sequence number within the request
    final: bool = True  # last (or only) chunk of the request
    output_offset: int = 0  # position of output_ids[0] in the request's whole output
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # consumers de-duplicate on it
    created_at: float = field(default_factory=time.time)  # unix seconds, producer clock
    schema_version: str = SCHEMA_VERSION  # as read off the wire; new events get the current one

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "prompt_ids", _frozen_array(self.prompt_ids, np.int32, 1, "prompt_ids"))
        set_(self, "output_ids", _frozen_array(self.output_ids, np.int32, 1, "output_ids"))
        for name in ("step_proposed", "step_accepted", "step_drafter"):
            set_(self, name, _frozen_array(getattr(self, name), np.int32, 1, name))
        set_(self, "topk_ids", _frozen_array(self.topk_ids, np.int32, 2, "topk_ids"))
        set_(self, "topk_logprobs", _frozen_array(self.topk_logprobs, np.float32, 2, "topk_logprobs"))
        set_(self, "drafters", tuple(self.drafters))
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> SchemaError:
            return SchemaError(DeadLetterReason.INVALID, msg)

        if not self.request_id:
            raise bad("request_id is empty")
        uuid.UUID(hex=self.event_id)  # raises ValueError on a malformed id
        t = len(self.output_ids)
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise bad(f"topk_ids {self.topk_ids.shape} != topk_logprobs {self.topk_logprobs.shape}")
        if self.topk_ids.shape[0] != t:
            raise bad(f"top-k rows {self.topk_ids.shape[0]} != output tokens {t}")
        s = len(self.step_proposed)
        if len(self.step_accepted) != s or len(self.step_drafter) != s:
            raise bad("step_proposed, step_accepted, step_drafter differ in length")
        if s and (self.step_accepted.min() < 0 or (self.step_accepted > self.step_proposed).any()):
            raise bad("need 0 <= accepted <= proposed at every step")
        if s and (self.step_drafter.min() < 0 or self.step_drafter.max() >= len(self.drafters)):
            raise bad(f"step_drafter indexes outside the {len(self.drafters)} drafters")
        if self.chunk < 0 or self.output_offset < 0:
            raise bad("chunk and output_offset must be >= 0")
        if self.chunk > 0 and len(self.prompt_ids):
            raise bad("only chunk 0 carries the prompt")

    @classmethod
    def make_dummy(cls, num_tokens: int = 16, k: int = 8, prompt_len: int = 32, *, request_id: str | None = None,
                   seed: int = 0, vocab: int = 49152, draft_len: int = 4, **fields: Any) -> "TokenEvent":
        """A plausible event for tests, warm-up and benchmarks: steps that add up to num_tokens,
        top-k rows whose first id is the emitted token, sorted peaked log-probs. `fields` override."""
        rng = np.random.default_rng(seed)
        out = rng.integers(0, vocab, num_tokens, dtype=np.int32)  # [T]
        proposed, accepted, left = [], [], num_tokens
        while left > 0:
            a = int(rng.integers(0, draft_len + 1))
            proposed.append(draft_len)
            accepted.append(min(a, left - 1))
            left -= accepted[-1] + 1
        topk = rng.integers(0, vocab, (num_tokens, k), dtype=np.int32)  # [T, K]
        if k:
            topk[:, 0] = out
        # Log-probs of a peaked distribution: the top token near 0, the rest falling off.
        logprobs = -np.cumsum(rng.exponential(1.0, (num_tokens, k)), axis=1).astype(np.float32)  # [T, K]
        base = dict(
            request_id=request_id or f"req-{seed}", replica_id="replica-0", target=ModelRef("smollm2-135m", "1"),
            drafters=(ModelRef("drafter", "1"),), prompt_ids=rng.integers(0, vocab, prompt_len, dtype=np.int32),
            output_ids=out, step_proposed=proposed, step_accepted=accepted, step_drafter=[0] * len(proposed),
            topk_ids=topk, topk_logprobs=logprobs, sampling=Sampling(0.7, 50, 0.95, num_tokens, seed),
            finish_reason="length", domain="chat", ttft_s=0.05, total_s=0.05 + 0.04 * num_tokens,
        )
        base.update(fields)
        return cls(**base)

    @property
    def num_tokens(self) -> int:
        """Generated tokens carried by this event (T)."""
        return len(self.output_ids)

    @property
    def k(self) -> int:
        """Top-k width (K)."""
        return self.topk_ids.shape[1]


@dataclass(frozen=True)
class Promotion:
    """Redis: drafter `name` has a new champion version; replicas load, verify, swap."""

    name: str  # registered drafter name
    version: str  # registry version now aliased champion
    model_uri: str  # where the weights are (models:/name/version, a path, ...)
    sha256: str  # of the weights file; replicas refuse weights that do not match
    promoted_at: float = field(default_factory=time.time)
    schema_version: str = SCHEMA_VERSION


@dataclass(frozen=True)
class Heartbeat:
    """Redis: one replica's load, refreshed every few seconds with a TTL; the trainer reads it."""

    replica_id: str
    running: int  # sequences being decoded now
    tokens_per_s: float  # recent decode throughput
    queue_depth: int  # requests waiting for admission
    ts: float = field(default_factory=time.time)
    schema_version: str = SCHEMA_VERSION


@dataclass(frozen=True)
class DeadLetter:
    """A record the consumer could not hand to its caller, kept with the reason and its bytes."""

    reason: DeadLetterReason
    detail: str  # the parser's message
    source_topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes  # the original record value, unchanged
    group: str = ""  # consumer group that rejected it
    failed_at: float = field(default_factory=time.time)
    schema_version: str = SCHEMA_VERSION


Message = Union[TokenEvent, Promotion, Heartbeat, DeadLetter]

# ------------------------------------------------------------------------------------- encoding


def _shuffle(arr: np.ndarray) -> bytes:
    # Byte planes: plane j holds byte j of every element. Token ids < 2^24 leave whole planes zero.
    a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()


def _unshuffle(buf: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    dt = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 0
    if len(buf) != count * dt.itemsize:
        raise SchemaError(DeadLetterReason.MALFORMED, f"array of {len(buf)} bytes for {dtype}{list(shape)}")
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(dt.itemsize, count)
    return np.ascontiguousarray(planes.T).view(dt).reshape(shape)


def _ref(m: ModelRef) -> list[str]:
    return [m.name, m.version]


def _event_body(ev: TokenEvent, logprobs_f32: bool) -> dict[str, Any]:
    lp = ev.topk_logprobs
    if not logprobs_f32:  # finite values clamp into float16's range; -inf (masked tokens) stays -inf
        lp = np.where(np.isneginf(lp), lp, np.clip(lp, -65504.0, 0.0)).astype(np.float16)
    s = ev.sampling
    return {
        "event_id": uuid.UUID(hex=ev.event_id).bytes,
        "request_id": ev.request_id,
        "replica_id": ev.replica_id,
        "target": _ref(ev.target),
        "drafters": [_ref(d) for d in ev.drafters],
        "domain": ev.domain,
        "sampling": [s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.seed],
        "finish_reason": ev.finish_reason,
        "ttft_s": ev.ttft_s,
        "total_s": ev.total_s,
        "chunk": ev.chunk,
        "final": ev.final,
        "output_offset": ev.output_offset,
        "created_at": ev.created_at,
        "prompt_ids": _shuffle(ev.prompt_ids),
        "output_ids": _shuffle(ev.output_ids),
        # Steps are small counts: uint16 / uint8 on the wire.
        "step_proposed": ev.step_proposed.astype(np.uint16).tobytes(),
        "step_accepted": ev.step_accepted.astype(np.uint16).tobytes(),
        "step_drafter": ev.step_drafter.astype(np.uint8).tobytes(),
        "k": ev.k,
        "topk_ids": _shuffle(ev.topk_ids),
        "logprob_dtype": "<f4" if logprobs_f32 else "<f2",
        "topk_logprobs": _shuffle(lp),
    }


def encode(msg: Message, *, codec: Codec | None = None, logprobs_f32: bool = False) -> bytes:
    """Serialise a message into envelope + body bytes.

    codec defaults to ZLIB for token events (kilobytes of arrays) and NONE for the rest (tens of
    bytes, where compression only adds a header). `logprobs_f32` keeps top-k log-probs in float32.
    """
    if isinstance(msg, TokenEvent):
        kind, body = Kind.TOKEN_EVENT, _event_body(msg, logprobs_f32)
        if len(msg.drafters) > 255:
            raise SchemaError(DeadLetterReason.INVALID, "more than 255 drafter versions in one event")
    elif isinstance(msg, Promotion):
        kind = Kind.PROMOTION
        body = {"name": msg.name, "version": msg.version, "model_uri": msg.model_uri,
                "sha256": msg.sha256, "promoted_at": msg.promoted_at}
    elif isinstance(msg, Heartbeat):
        kind = Kind.HEARTBEAT
        body = {"replica_id": msg.replica_id, "running": msg.running, "tokens_per_s": msg.tokens_per_s,
                "queue_depth": msg.queue_depth, "ts": msg.ts}
    elif isinstance(msg, DeadLetter):
        kind = Kind.DEAD_LETTER
        body = {"reason": msg.reason.value, "detail": msg.detail, "source_topic": msg.source_topic,
                "partition": msg.partition, "offset": msg.offset, "key": msg.key, "payload": msg.payload,
                "group": msg.group, "failed_at": msg.failed_at}
    else:
        raise TypeError(f"not a spectutor wire message: {type(msg).__name__}")
    if codec is None:
        codec = Codec.ZLIB if kind is Kind.TOKEN_EVENT else Codec.NONE
    raw = msgpack.packb(body, use_bin_type=True)
    # Level 1: within a few percent of level 6 on these byte-shuffled arrays, at half the cost.
    data = zlib.compress(raw, 1) if codec is Codec.ZLIB else raw
    return _HEADER.pack(MAGIC, SCHEMA_MAJOR, SCHEMA_MINOR, kind, codec) + data


def header(data: bytes) -> tuple[int, int, Kind]:
    """(major, minor, kind) of a record, checking only the envelope; raises SchemaError."""
    if len(data) < HEADER_BYTES:
        raise SchemaError(DeadLetterReason.MALFORMED, f"{len(data)} bytes is shorter than the envelope")
    magic, major, minor, kind, _codec = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SchemaError(DeadLetterReason.MALFORMED, f"bad magic {magic!r}")
    if major != SCHEMA_MAJOR:
        raise SchemaError(DeadLetterReason.UNKNOWN_MAJOR,
                          f"schema {major}.{minor}; this reader speaks major {SCHEMA_MAJOR}")
    try:
        return major, minor, Kind(kind)
    except ValueError:
        raise SchemaError(DeadLetterReason.MALFORMED, f"unknown kind {kind}") from None


class _Body:
    """Typed access to a decoded map; every failure becomes a MALFORMED SchemaError."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise SchemaError(DeadLetterReason.MALFORMED, "body is not a map")
        self.body = body

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ..., nullable: bool = False) -> Any:
        if key not in self.body:
            if default is ...:
                raise SchemaError(DeadLetterReason.MALFORMED, f"missing field {key!r}")
            return default
        value = self.body[key]
        if value is None and nullable:
            return None
        # bool is an int subclass: a flag where a count belongs is a type error, not a 1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise SchemaError(DeadLetterReason.MALFORMED, f"field {key!r} has type {type(value).__name__}")
        return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


_NUM = (int, float)


def _model_ref(value: Any, name: str) -> ModelRef:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise SchemaError(DeadLetterReason.MALFORMED, f"field {name!r} is not [name, version]")
    return ModelRef(value[0], value[1])


def _decode_event(b: _Body, version: str) -> TokenEvent:
    t = len(b.get("output_ids", bytes)) // 4
    k = b.get("k", int)
    drafters = b.get("drafters", list)
    samp = b.get("sampling", list)
    if len(samp) != 5:
        raise SchemaError(DeadLetterReason.MALFORMED, "sampling must have 5 entries")
    lp_dtype = b.get("logprob_dtype", str)
    if lp_dtype not in ("<f2", "<f4"):
        raise SchemaError(DeadLetterReason.MALFORMED, f"logprob_dtype {lp_dtype!r}")
    event_id = b.get("event_id", bytes)
    if len(event_id) != 16:
        raise SchemaError(DeadLetterReason.MALFORMED, "event_id is not 16 bytes")
    p = len(b.get("prompt_ids", bytes)) // 4

    def steps(name: str, dtype: str) -> np.ndarray:
        return np.frombuffer(b.get(name, bytes), dtype=dtype).astype(np.int32)

    return TokenEvent(
        request_id=b.get("request_id", str),
        replica_id=b.get("replica_id", str),
        target=_model_ref(b.get("target", list), "target"),
        drafters=tuple(_model_ref(d, "drafters") for d in drafters),
        prompt_ids=_unshuffle(b.get("prompt_ids", bytes), "<i4", (p,)),
        output_ids=_unshuffle(b.get("output_ids", bytes), "<i4", (t,)),
        step_proposed=steps("step_proposed", "<u2"),
        step_accepted=steps("step_accepted", "<u2"),
        step_drafter=steps("step_drafter", "u1"),
        topk_ids=_unshuffle(b.get("topk_ids", bytes), "<i4", (t, k)),
        topk_logprobs=_unshuffle(b.get("topk_logprobs", bytes), lp_dtype, (t, k)),
        sampling=Sampling(
            temperature=float(_typed(samp[0], _NUM, "sampling.temperature")),
            top_k=_typed(samp[1], int, "sampling.top_k"),
            top_p=float(_typed(samp[2], _NUM, "sampling.top_p")),
            max_new_tokens=_typed(samp[3], int, "sampling.max_new_tokens"),
            seed=None if samp[4] is None else _typed(samp[4], int, "sampling.seed"),
        ),
        finish_reason=b.get("finish_reason", str, None, nullable=True),
        domain=b.get("domain", str, None, nullable=True),
        ttft_s=b.get("ttft_s", _NUM, None, nullable=True),
        total_s=b.get("total_s", _NUM, None, nullable=True),
        chunk=b.get("chunk", int, 0),
        final=b.get("final", bool, True),
        output_offset=b.get("output_offset", int, 0),
        event_id=event_id.hex(),
        created_at=float(b.get("created_at", _NUM)),
        schema_version=version,
    )


def _typed(value: Any, types: type | tuple[type, ...], name: str) -> Any:
    if not isinstance(value, types) or isinstance(value, bool):
        raise SchemaError(DeadLetterReason.MALFORMED, f"{name} has type {type(value).__name__}")
    return value


def decode(data: bytes) -> Message:
    """Parse envelope + body into a message; raises SchemaError(reason, detail) on any defect.

    Unknown fields are ignored and missing optional fields take their defaults (the minor rule);
    a different major raises with reason UNKNOWN_MAJOR before the body is touched.
    """
    major, minor, kind = header(data)
    codec = data[5]
    body_bytes = memoryview(data)[HEADER_BYTES:]
    try:
        if codec == Codec.ZLIB:
            body_bytes = zlib.decompress(body_bytes)
        elif codec != Codec.NONE:
            raise SchemaError(DeadLetterReason.MALFORMED, f"unknown codec {codec}")
        # Bounded containers: a hostile length prefix must not allocate gigabytes.
        raw = msgpack.unpackb(body_bytes, raw=False, strict_map_key=True, max_bin_len=64 << 20)
    except SchemaError:
        raise
    except Exception as exc:  # zlib.error, msgpack's several exception types, UnicodeDecodeError
        raise SchemaError(DeadLetterReason.MALFORMED, f"{type(exc).__name__}: {exc}") from None
    b = _Body(raw)
    version = f"{major}.{minor}"
    try:
        if kind is Kind.TOKEN_EVENT:
            return _decode_event(b, version)
        if kind is Kind.PROMOTION:
            return Promotion(name=b.get("name", str), version=b.get("version", str),
                             model_uri=b.get("model_uri", str), sha256=b.get("sha256", str),
                             promoted_at=float(b.get("promoted_at", _NUM)), schema_version=version)
        if kind is Kind.HEARTBEAT:
            return Heartbeat(replica_id=b.get("replica_id", str), running=b.get("running", int),
                             tokens_per_s=float(b.get("tokens_per_s", _NUM)),
                             queue_depth=b.get("queue_depth", int), ts=float(b.get("ts", _NUM)),
                             schema_version=version)
        reason = b.get("reason", str)
        try:
            reason_enum = DeadLetterReason(reason)
        except ValueError:
            raise SchemaError(DeadLetterReason.MALFORMED, f"unknown dead-letter reason {reason!r}") from None
        return DeadLetter(reason=reason_enum, detail=b.get("detail", str),
                          source_topic=b.get("source_topic", str), partition=b.get("partition", int),
                          offset=b.get("offset", int), key=b.get("key", bytes, None, nullable=True),
                          payload=b.get("payload", bytes), group=b.get("group", str, ""),
                          failed_at=float(b.get("failed_at", _NUM)), schema_version=version)
    except SchemaError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a bad uuid, a negative shape
        raise SchemaError(DeadLetterReason.INVALID, f"{type(exc).__name__}: {exc}") from None


def decode_event(data: bytes) -> TokenEvent:
    """`decode` that also insists on a token event (UNEXPECTED_KIND otherwise)."""
    msg = decode(data)
    if not isinstance(msg, TokenEvent):
        raise SchemaError(DeadLetterReason.UNEXPECTED_KIND, f"expected a token event, got {type(msg).__name__}")
    return msg


# --------------------------------------------------------------------------------------- chunks


def join_chunks(chunks: list[TokenEvent]) -> TokenEvent:
    """One whole-request event from its chunks 0..n-1 (any order in, checked for gaps).

    Drafter tables are merged and step indices remapped; the result keeps chunk 0's event_id.
    """
    if not chunks:
        raise ValueError("no chunks")
    parts = sorted(chunks, key=lambda c: c.chunk)
    first, last = parts[0], parts[-1]
    if [c.chunk for c in parts] != list(range(len(parts))) or not last.final:
        raise ValueError(f"chunks {[c.chunk for c in parts]} (final={last.final}) are not a complete 0..n-1 run")
    if len({c.request_id for c in parts}) != 1:
        raise ValueError("chunks of different requests")
    offset = 0
    drafters: list[ModelRef] = []
    step_drafter = []
    for c in parts:
        if c.output_offset != offset:
            raise ValueError(f"chunk {c.chunk} starts at output {c.output_offset}, expected {offset}")
        offset += c.num_tokens
        remap = []
        for d in c.drafters:
            if d not in drafters:
                drafters.append(d)
            remap.append(drafters.index(d))
        step_drafter.append(np.asarray(remap, dtype=np.int32)[c.step_drafter] if len(c.step_drafter) else c.step_drafter)
    cat = np.concatenate
    return TokenEvent(
        request_id=first.request_id, replica_id=last.replica_id, target=first.target, drafters=tuple(drafters),
        prompt_ids=first.prompt_ids, output_ids=cat([c.output_ids for c in parts]),
        step_proposed=cat([c.step_proposed for c in parts]), step_accepted=cat([c.step_accepted for c in parts]),
        step_drafter=cat(step_drafter),
        topk_ids=cat([c.topk_ids for c in parts]), topk_logprobs=cat([c.topk_logprobs for c in parts]),
        sampling=first.sampling, finish_reason=last.finish_reason, domain=first.domain,
        ttft_s=first.ttft_s, total_s=last.total_s, event_id=first.event_id, created_at=first.created_at,
    )
