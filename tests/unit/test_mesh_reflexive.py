"""Reflexive probes on explicit ``now`` values: schedule, retries, refresh, expiry, and
answers that are forged, replayed or malformed (counted, ignored)."""

from __future__ import annotations

import itertools

from uspan.discovery.reflect import (
    ANSWER_SIZE,
    PROBE_SIZE,
    ProbeResponder,
    decode_answer,
    decode_probe,
    encode_answer,
    encode_probe,
)
from uspan.mesh.reflexive import EXPIRY, INTERVAL, RETRY, ReflexiveProber
from uspan.wg.endpoint import Endpoint

SERVICE = Endpoint("192.0.2.254", 3000)
SEEN = Endpoint("203.0.113.7", 40001)


def nonces():
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(16, "big")


def answered(data: bytes, seen: Endpoint = SEEN) -> bytes:
    nonce = decode_probe(data)
    assert nonce is not None
    return encode_answer(nonce, seen.host, seen.port)


def test_codec_round_trips_and_a_probe_is_never_smaller_than_its_answer():
    probe = encode_probe(b"n" * 16)
    assert len(probe) == PROBE_SIZE >= ANSWER_SIZE and probe[:4] == b"\xffPRB"
    assert decode_probe(probe) == b"n" * 16
    assert decode_answer(encode_answer(b"n" * 16, "2001:db8::5", 9)) == (
        b"n" * 16, Endpoint("2001:db8::5", 9))
    assert decode_answer(encode_answer(b"n" * 16, "::ffff:192.0.2.1", 9)) == (
        b"n" * 16, Endpoint("192.0.2.1", 9))
    assert decode_probe(probe[:-1]) is None and decode_probe(b"\xffPRA" + probe[4:]) is None
    assert decode_answer(encode_answer(b"n" * 16, "192.0.2.1", 9)[:-1]) is None
    assert decode_answer(encode_answer(b"n" * 16, "0.0.0.0", 9)) is None


def test_the_service_answers_with_the_source_it_saw_and_rate_limits_per_ip():
    responder = ProbeResponder(rate=1.0, burst=2)
    probe = encode_probe(b"n" * 16)
    answers = [responder.answer(probe, ("198.51.100.9", 51820), 0.0) for _ in range(3)]
    assert answers[0] is not None and decode_answer(answers[0]) == (
        b"n" * 16, Endpoint("198.51.100.9", 51820))
    assert answers[2] is None
    assert responder.answer(b"garbage", ("198.51.100.9", 1), 5.0) is None
    assert responder.counts == {"answered": 2, "ratelimited": 1, "malformed": 1}


def test_probe_at_once_then_every_interval_once_answered():
    prober = ReflexiveProber([SERVICE], nonces())
    [(probe, target)] = prober.poll(0.0)
    assert target == SERVICE and prober.endpoints(0.0) == ()
    assert prober.answer(answered(probe), 0.1) is True
    assert prober.endpoints(0.1) == (SEEN,)
    assert prober.next_deadline() == 0.1 + INTERVAL
    assert prober.poll(INTERVAL) == []
    assert len(prober.poll(0.1 + INTERVAL)) == 1


def test_an_unanswered_probe_is_retried_and_an_old_result_expires():
    prober = ReflexiveProber([SERVICE], nonces())
    prober.answer(answered(prober.poll(0.0)[0][0]), 0.0)
    now = INTERVAL
    while now < EXPIRY:  # the service stops answering
        assert prober.endpoints(now) == (SEEN,)
        assert len(prober.poll(now)) == 1
        assert prober.next_deadline() == min(now + RETRY, EXPIRY)
        now += RETRY
    assert prober.endpoints(EXPIRY) == ()


def test_a_late_answer_to_a_recent_probe_counts():
    prober = ReflexiveProber([SERVICE], nonces())
    first = prober.poll(0.0)[0][0]
    prober.poll(RETRY)  # a retry: the first answer arrives late
    assert prober.answer(answered(first), RETRY + 0.5) is True


def test_refresh_probes_at_once_but_not_more_often_than_retry():
    prober = ReflexiveProber([SERVICE], nonces())
    prober.answer(answered(prober.poll(0.0)[0][0]), 0.0)
    prober.refresh(1.0)
    assert prober.next_deadline() == RETRY  # not before RETRY after the last probe
    prober.answer(answered(prober.poll(RETRY)[0][0]), RETRY)
    assert prober.next_deadline() == RETRY + INTERVAL
    prober.refresh(10.0)
    assert prober.next_deadline() == 10.0
    assert len(prober.poll(10.0)) == 1


def test_forged_replayed_and_malformed_answers_are_counted_and_ignored():
    prober = ReflexiveProber([SERVICE], nonces())
    probe = prober.poll(0.0)[0][0]
    forged = encode_answer(b"\x99" * 16, "192.0.2.66", 666)  # did not see the probe
    assert prober.answer(forged, 0.1) is False
    assert prober.answer(b"\xffPRA" + b"\0" * 3, 0.1) is False
    assert prober.endpoints(0.1) == ()
    assert prober.answer(answered(probe), 0.2) is True
    replayed = answered(probe, Endpoint("192.0.2.66", 666))  # the nonce, used again
    assert prober.answer(replayed, 0.3) is False
    assert prober.endpoints(0.3) == (SEEN,)
    assert (prober.counts["forged"], prober.counts["malformed"]) == (2, 1)


def test_a_changed_mapping_replaces_the_endpoint_and_two_services_may_differ():
    other = Endpoint("198.51.100.254", 3000)
    prober = ReflexiveProber([SERVICE, other], nonces())
    (a, _), (b, _) = prober.poll(0.0)
    prober.answer(answered(a), 0.1)
    assert prober.answer(answered(b, Endpoint("203.0.113.7", 40002)), 0.1) is True
    assert prober.endpoints(0.1) == (SEEN, Endpoint("203.0.113.7", 40002))  # hard NAT
    assert prober.answer(answered(b), 0.2) is False  # replay: forged, nothing changes
