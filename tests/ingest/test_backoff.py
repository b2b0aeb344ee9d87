"""`ingest.backoff.Backoff`: the waits it sleeps, exactly, with the jitter and the
sleep injected."""

from __future__ import annotations

import pytest

from ingest.backoff import Backoff


def recording(jitter_draws: list[float]) -> tuple[Backoff, list[float], list[tuple[float, float]]]:
    slept: list[float] = []
    asked: list[tuple[float, float]] = []
    draws = iter(jitter_draws)

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return next(draws)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return Backoff(uniform=uniform, sleep=sleep), slept, asked


async def test_the_delay_doubles_from_a_tenth_of_a_second_up_to_five() -> None:
    backoff, slept, asked = recording([1.0] * 9)
    nominal = []
    for _ in range(9):
        nominal.append(backoff.delay_s)
        await backoff.wait()
    assert nominal == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert slept == pytest.approx(nominal)
    assert asked == [(0.5, 1.5)] * 9
    assert backoff.delay_s == 5.0


async def test_each_wait_is_the_nominal_delay_times_the_jitter_drawn() -> None:
    backoff, slept, _ = recording([0.5, 1.5, 1.25])
    for _ in range(3):
        await backoff.wait()
    assert slept == pytest.approx([0.05, 0.3, 0.5])


async def test_its_shape_is_configurable() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = Backoff(initial_s=1, max_s=10, multiplier=3, jitter=0, sleep=sleep)
    for _ in range(4):
        await backoff.wait()
    assert slept == [1, 3, 9, 10]


def test_a_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError) as refused:
        Backoff(jitter=1.5)
    assert str(refused.value) == "jitter must be between 0 and 1, not 1.5"
