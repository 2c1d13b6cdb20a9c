"""The evaluator's timing and accuracy statistics, on a fake clock so the numbers are exact."""
import pytest

from optimization import evaluator


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds):
        def invoke():
            self.now += seconds
        return invoke


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(evaluator.time, "perf_counter", fake)
    return fake


def test_paired_latency_gives_the_speedup_of_a_twice_as_fast_candidate(clock):
    result = evaluator.paired_latency(clock.work(0.001), clock.work(0.002))
    assert result["latency_ms"] == pytest.approx(1.0)
    assert result["speedup"] == pytest.approx(2.0)
    assert result["speedup_low"] == pytest.approx(2.0) and result["speedup_high"] == pytest.approx(2.0)
    assert result["speedup_within_noise"] is False


def test_a_load_spell_slows_both_sides_of_a_pair_and_leaves_the_speedup_alone(clock):
    def slowed(seconds):
        def invoke():  # three times slower while the clock is in a busy spell
            clock.now += seconds * (3 if 0.25 <= clock.now < 0.9 else 1)
        return invoke

    result = evaluator.paired_latency(slowed(0.001), slowed(0.002))
    assert result["speedup"] == pytest.approx(2.0)
    assert result["latency_ms_high"] == pytest.approx(3.0)
    assert result["latency_ms"] == pytest.approx(1.0)


def test_equal_models_are_reported_within_the_noise(clock):
    result = evaluator.paired_latency(clock.work(0.001), clock.work(0.001))
    assert result["speedup"] == pytest.approx(1.0)
    assert result["speedup_within_noise"] is True


def test_steady_latency_is_the_fastest_block(clock):
    assert evaluator.steady_latency_ms(clock.work(0.0005)) == pytest.approx(0.5)


@pytest.mark.parametrize("correct, n, low, high", [
    (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (359, 359, 0.9894, 1.0), (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_matches_the_textbook_values(correct, n, low, high):
    got_low, got_high = evaluator.wilson_interval(correct, n)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)
