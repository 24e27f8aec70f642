"""Wire schema: round trips, the version rules, malformed input, chunks, size."""

from __future__ import annotations

import dataclasses
import zlib

import msgpack
import numpy as np
import pytest

from streams import schema
from streams.schema import (
    DeadLetter,
    DeadLetterReason,
    Heartbeat,
    Kind,
    ModelRef,
    Promotion,
    SchemaError,
    TokenEvent,
    decode,
    decode_event,
    encode,
    join_chunks,
)

SCALARS = ("request_id", "replica_id", "target", "drafters", "sampling", "finish_reason", "domain", "ttft_s",
           "total_s", "chunk", "final", "output_offset", "event_id", "created_at")
ARRAYS = ("prompt_ids", "output_ids", "step_proposed", "step_accepted", "step_drafter", "topk_ids")


def assert_same_event(a: TokenEvent, b: TokenEvent, logprob_atol: float = 0.0) -> None:
    for name in SCALARS:
        assert getattr(a, name) == getattr(b, name), name
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, rtol=0, atol=logprob_atol)


def envelope(body: dict, major: int = schema.SCHEMA_MAJOR, minor: int = schema.SCHEMA_MINOR,
             kind: int = Kind.TOKEN_EVENT, codec: int = schema.Codec.ZLIB) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    data = zlib.compress(raw) if codec == schema.Codec.ZLIB else raw
    return schema._HEADER.pack(schema.MAGIC, major, minor, kind, codec) + data


def event_body(ev: TokenEvent) -> dict:
    return schema._event_body(ev, logprobs_f32=False)


@pytest.mark.parametrize("k,tokens,prompt", [(8, 128, 100), (32, 7, 1), (0, 3, 0), (4, 0, 5)])
def test_event_round_trip_float16_within_documented_bound(k: int, tokens: int, prompt: int) -> None:
    ev = TokenEvent.make_dummy(tokens, k, prompt, seed=k + tokens)
    back = decode_event(encode(ev))
    assert back.schema_version == schema.SCHEMA_VERSION
    # Documented: <= 2^-11 relative; the dummy log-probs stay above -64.
    assert_same_event(ev, back, logprob_atol=64 * 2.0**-11)
    assert back.topk_logprobs.dtype == np.float32


def test_event_round_trip_float32_is_exact_and_inf_survives() -> None:
    lp = np.full((3, 2), -np.inf, dtype=np.float32)
    lp[:, 0] = [-0.1, -1e-7, -70000.0]
    ev = TokenEvent.make_dummy(3, 2, 4, topk_logprobs=lp)
    assert_same_event(ev, decode_event(encode(ev, logprobs_f32=True)))
    half = decode_event(encode(ev)).topk_logprobs
    assert np.isneginf(half[:, 1]).all()
    assert half[2, 0] == -65504.0  # clamped to float16's range, not turned into -inf


def test_other_messages_round_trip() -> None:
    p = Promotion("drafter", "7", "models:/drafter/7", "ab" * 32)
    h = Heartbeat("replica-3", running=4, tokens_per_s=88.5, queue_depth=2)
    d = DeadLetter(DeadLetterReason.UNKNOWN_MAJOR, "schema 9.0", "t", 2, 41, b"k", b"\x00raw", group="g")
    for msg in (p, h, d):
        assert decode(encode(msg)) == msg
    d_nokey = dataclasses.replace(d, key=None)
    assert decode(encode(d_nokey)) == d_nokey


def test_event_is_read_only_and_private_copy() -> None:
    ids = np.arange(4, dtype=np.int32)
    ev = TokenEvent.make_dummy(4, 2, 0, output_ids=ids, topk_ids=np.stack([ids, ids], 1))
    ids[0] = 99  # the engine reusing its buffer must not change the event
    assert ev.output_ids[0] == 0
    with pytest.raises(ValueError):
        ev.output_ids[0] = 5


# ----------------------------------------------------------------------------------- versions


@pytest.mark.parametrize("major", [0, schema.SCHEMA_MAJOR + 1, 255])
def test_other_major_is_refused_before_the_body_is_read(major: int) -> None:
    data = schema._HEADER.pack(schema.MAGIC, major, 0, Kind.TOKEN_EVENT, 1) + b"not even zlib"
    with pytest.raises(SchemaError) as err:
        decode(data)
    assert err.value.reason is DeadLetterReason.UNKNOWN_MAJOR


def test_newer_minor_with_added_fields_is_read() -> None:
    ev = TokenEvent.make_dummy(5, 3, 2)
    body = {**event_body(ev), "hidden_state_uri": "s3://x", "new_counter": 3}
    back = decode_event(envelope(body, minor=schema.SCHEMA_MINOR + 4))
    assert back.schema_version == f"{schema.SCHEMA_MAJOR}.{schema.SCHEMA_MINOR + 4}"
    assert_same_event(ev, back, logprob_atol=1e-2)


def test_older_writer_without_optional_fields_gets_defaults() -> None:
    ev = TokenEvent.make_dummy(5, 3, 2)
    body = event_body(ev)
    for optional in ("domain", "ttft_s", "total_s", "chunk", "final", "output_offset", "finish_reason"):
        del body[optional]
    back = decode_event(envelope(body))
    assert (back.domain, back.ttft_s, back.chunk, back.final, back.output_offset, back.finish_reason) == (
        None, None, 0, True, 0, None)


@pytest.mark.parametrize("field", ["request_id", "output_ids", "topk_ids", "event_id", "sampling", "target"])
def test_missing_required_field_is_malformed(field: str) -> None:
    body = event_body(TokenEvent.make_dummy(5, 3, 2))
    del body[field]
    with pytest.raises(SchemaError) as err:
        decode(envelope(body))
    assert err.value.reason is DeadLetterReason.MALFORMED
    assert field in str(err.value)


# ---------------------------------------------------------------------------------- malformed


def _bad_records() -> dict[str, bytes]:
    good = encode(TokenEvent.make_dummy(6, 4, 3))
    body = event_body(TokenEvent.make_dummy(6, 4, 3))
    return {
        "empty": b"",
        "short": b"ST\x01",
        "bad magic": b"XX" + good[2:],
        "unknown kind": good[:4] + b"\x09" + good[5:],
        "unknown codec": good[:5] + b"\x07" + good[6:],
        "truncated": good[: len(good) // 2],
        "not msgpack": envelope({}, codec=schema.Codec.NONE)[:6] + b"\xc1\xc1\xc1",
        "body not a map": schema._HEADER.pack(schema.MAGIC, 1, 0, 1, 0) + msgpack.packb([1, 2]),
        "wrong type": envelope({**body, "request_id": 5}),
        "bool as int": envelope({**body, "k": True}),
        "array size": envelope({**body, "topk_ids": body["topk_ids"][:-1]}),
        "short event id": envelope({**body, "event_id": b"123"}),
        "sampling length": envelope({**body, "sampling": [0.5]}),
        "logprob dtype": envelope({**body, "logprob_dtype": "<f8"}),
    }


@pytest.mark.parametrize("name", list(_bad_records()))
def test_malformed_records_raise_schema_error(name: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode(_bad_records()[name])
    assert err.value.reason in (DeadLetterReason.MALFORMED, DeadLetterReason.INVALID)


def test_invariant_violations_are_invalid() -> None:
    body = event_body(TokenEvent.make_dummy(6, 4, 3))
    accepted = np.frombuffer(body["step_accepted"], np.uint16).copy()
    accepted[0] = 60000  # more accepted than proposed
    with pytest.raises(SchemaError) as err:
        decode(envelope({**body, "step_accepted": accepted.tobytes()}))
    assert err.value.reason is DeadLetterReason.INVALID
    with pytest.raises(SchemaError):
        TokenEvent.make_dummy(6, 4, 3, step_drafter=[5] * 10, step_proposed=[1] * 10, step_accepted=[0] * 10)
    with pytest.raises(SchemaError):
        TokenEvent.make_dummy(6, 4, 3, topk_ids=np.zeros((5, 4)))
    with pytest.raises(SchemaError):
        TokenEvent.make_dummy(6, 4, 3, chunk=1)  # later chunks carry no prompt


def test_random_corruption_only_ever_raises_schema_error() -> None:
    good = encode(TokenEvent.make_dummy(16, 8, 8))
    rng = np.random.default_rng(0)
    for _ in range(400):
        data = bytearray(good)
        for i in rng.integers(0, len(data), rng.integers(1, 4)):
            data[i] = int(rng.integers(0, 256))
        try:
            decode(bytes(data))
        except SchemaError:
            pass


def test_decode_event_refuses_other_kinds() -> None:
    with pytest.raises(SchemaError) as err:
        decode_event(encode(Promotion("d", "1", "u", "s")))
    assert err.value.reason is DeadLetterReason.UNEXPECTED_KIND


# ------------------------------------------------------------------------------------- chunks


def _split(ev: TokenEvent, steps_per_chunk: int) -> list[TokenEvent]:
    """Chunks the way the engine emits them: every N steps, tokens of those steps."""
    emitted = np.minimum(ev.step_accepted + 1, ev.num_tokens)  # tokens per step
    ends = np.cumsum(emitted)
    ends[-1] = ev.num_tokens
    chunks, start_tok = [], 0
    n_steps = len(ev.step_proposed)
    for c, s0 in enumerate(range(0, n_steps, steps_per_chunk)):
        s1 = min(s0 + steps_per_chunk, n_steps)
        t1 = int(ends[s1 - 1])
        sl = slice(start_tok, t1)
        chunks.append(dataclasses.replace(
            ev, event_id=TokenEvent.make_dummy(1, 1, 0).event_id, chunk=c, final=s1 == n_steps,
            prompt_ids=ev.prompt_ids if c == 0 else [], output_offset=start_tok,
            output_ids=ev.output_ids[sl], topk_ids=ev.topk_ids[sl], topk_logprobs=ev.topk_logprobs[sl],
            step_proposed=ev.step_proposed[s0:s1], step_accepted=ev.step_accepted[s0:s1],
            step_drafter=ev.step_drafter[s0:s1], finish_reason=ev.finish_reason if s1 == n_steps else None))
        start_tok = t1
    return chunks


def test_chunks_join_back_into_the_request() -> None:
    ev = TokenEvent.make_dummy(60, 4, 10, seed=3)
    chunks = _split(ev, 5)
    assert len(chunks) > 2 and chunks[-1].final and not chunks[0].final
    wire = [decode_event(encode(c, logprobs_f32=True)) for c in reversed(chunks)]
    joined = join_chunks(wire)
    assert_same_event(dataclasses.replace(ev, event_id=chunks[0].event_id), joined)


def test_join_merges_drafter_tables_across_a_hot_swap() -> None:
    ev = TokenEvent.make_dummy(40, 2, 4, seed=1)
    a, b = _split(ev, 4)[:2]
    v1, v2 = ModelRef("drafter", "1"), ModelRef("drafter", "2")
    a = dataclasses.replace(a, drafters=(v1, v2), step_drafter=[0, 0, 1, 1])
    b = dataclasses.replace(b, drafters=(v2,), step_drafter=[0] * len(b.step_drafter), final=True)
    joined = join_chunks([a, b])
    assert joined.drafters == (v1, v2)
    assert joined.step_drafter.tolist() == [0, 0, 1, 1] + [1] * len(b.step_drafter)


def test_join_refuses_gaps() -> None:
    chunks = _split(TokenEvent.make_dummy(60, 2, 4), 5)
    with pytest.raises(ValueError):
        join_chunks(chunks[:1] + chunks[2:])
    with pytest.raises(ValueError):
        join_chunks(chunks[:-1])  # no final chunk


def test_bytes_per_token_stay_compact() -> None:
    # A regression guard for the documented figure (bench/results/streams-cpu.json has the real one).
    for k, limit in ((8, 45), (32, 130)):
        ev = TokenEvent.make_dummy(128, k, 128, seed=k)
        assert len(encode(ev)) / ev.num_tokens < limit, k
