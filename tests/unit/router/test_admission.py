"""Admission: every sequence of a request (OpenAI's n, best_of; TGI's best_of) takes one slot of
--max-concurrent-requests; a request that does not fit the free slots gets a 429 at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from router.errors import OverloadedError, UnhealthyError, ValidationError
from router.infer import Infer
from router.metrics import Metrics


def fake_infer(max_concurrent_requests: int) -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(max_concurrent_requests=max_concurrent_requests),
        draining=False,
        in_flight=0,
        metrics=Metrics(16, 32, "m"),
    )


def admit(infer: SimpleNamespace):
    return Infer.admit(infer)  # type: ignore[arg-type]


def test_each_sequence_holds_a_slot_until_the_request_ends() -> None:
    infer = fake_infer(4)
    with admit(infer) as slots:
        assert infer.in_flight == 1
        slots.need(3)
        assert infer.in_flight == 3 and slots.held == 3
        slots.need(2)  # never shrinks
        assert infer.in_flight == 3
        with admit(infer):
            assert infer.in_flight == 4
    assert infer.in_flight == 0


def test_sequences_past_the_free_slots_are_a_429_and_hold_nothing() -> None:
    infer = fake_infer(4)
    with admit(infer), admit(infer), admit(infer) as slots:
        with pytest.raises(OverloadedError) as error:
            slots.need(3, "n")
        assert error.value.status == 429
        assert error.value.message == (
            "Model is overloaded: the request runs 3 sequences, and 2 of the 4 slots "
            "(--max-concurrent-requests) are free"
        )
        assert infer.in_flight == 3
        slots.need(2, "n")  # what fits is taken
        assert infer.in_flight == 4
        with pytest.raises(OverloadedError, match=r"^Model is overloaded$"), admit(infer):
            pass
    assert infer.in_flight == 0
    assert infer.metrics.request_failure.labels("overloaded")._value.get() == 2


def test_more_sequences_than_the_server_runs_is_a_validation_error_naming_the_field() -> None:
    infer = fake_infer(4)
    with admit(infer) as slots, pytest.raises(ValidationError) as error:
        slots.need(5, "best_of")
    assert error.value.param == "best_of" and error.value.status == 422
    assert error.value.detail == (
        "`best_of` asks for 5 sequences, more than the 4 this server runs at once (--max-concurrent-requests)"
    )
    assert infer.in_flight == 0


def test_draining_admits_nothing() -> None:
    infer = fake_infer(4)
    infer.draining = True
    with pytest.raises(UnhealthyError), admit(infer):
        pass
    assert infer.in_flight == 0
