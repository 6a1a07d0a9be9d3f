"""Unit tests of placement and traffic rules with stand-in backends and a hand-driven clock: the
latency predictor, the pool gate's hysteresis, the router's choice of pool by cost and objective,
probes, the traffic split and its sticky key, and the bounded mirror. The same behaviour is tested
end to end against real Tritons in test_placement.py and test_traffic.py."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest

from gateway.errors import ConfigError, Unavailable
from gateway.protocol import pb
from gateway.routing.config import RoutingConfig
from gateway.routing.config import ModelRoute
from gateway.routing.mirror import Mirror
from gateway.routing.placement import LatencyEstimate, PoolGate, load_score
from gateway.routing.router import CANARY, PREFERRED, PROBE, SHADOW, SPILL, Router
from gateway.server.rpc import Call
from gateway.traffic.split import VersionSplit, key_fraction
from gateway.traffic.stats import OutputComparison
from tests.test_routing_units import StandInBackend, StandInFleet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the predictor --------------------------------------------------------------------------------


def test_estimate_learns_service_time_per_request_in_line():
    estimate = LatencyEstimate()
    assert estimate.predict(5) == 0.0  # nothing known: predicted fast, so it gets tried
    estimate.observe(0.040, ahead=3, now=1.0, tau_s=1.0)  # 40 ms with 3 ahead: 10 ms a request
    assert estimate.service_s == pytest.approx(0.010)
    assert estimate.predict(0) == pytest.approx(0.010)
    assert estimate.predict(4) == pytest.approx(0.050)


def test_estimate_weighs_by_time_not_by_count():
    dense, sparse = LatencyEstimate(), LatencyEstimate()
    for estimate in (dense, sparse):
        estimate.observe(0.010, 0, now=0.0, tau_s=1.0)
    for i in range(1, 11):  # ten answers 1 ms apart barely move it
        dense.observe(0.100, 0, now=i * 0.001, tau_s=1.0)
    assert dense.service_s < 0.012
    sparse.observe(0.100, 0, now=5.0, tau_s=1.0)  # one answer after 5 tau counts almost fully
    assert sparse.service_s == pytest.approx(0.100 - 0.090 * math.exp(-5), rel=1e-9)


def test_load_score_prefers_short_queues_then_fast_backends():
    fast, slow, unknown = LatencyEstimate(), LatencyEstimate(), LatencyEstimate()
    fast.observe(0.001, 0, 1.0, 1.0)
    slow.observe(0.010, 0, 1.0, 1.0)
    assert load_score(fast, 3, 1.0, 1.0) < load_score(slow, 0, 1.0, 1.0)  # 4 ms vs 10 ms
    assert load_score(unknown, 0, 1.0, 1.0) < load_score(unknown, 1, 1.0, 1.0)  # nothing known: outstanding decides


def test_load_score_of_an_unobserved_backend_decays_so_it_is_tried_again():
    stale, busy = LatencyEstimate(), LatencyEstimate()
    stale.observe(2.0, 0, now=0.0, tau_s=0.5)  # a cold start's 2 s answer, then no traffic
    busy.observe(0.002, 0, now=10.0, tau_s=0.5)
    assert load_score(stale, 0, 0.5, 0.5) > load_score(busy, 8, 0.5, 0.5)  # fresh: avoided
    assert load_score(stale, 0, 10.0, 0.5) < load_score(busy, 8, 10.0, 0.5)  # 10 s later: tried again
    assert load_score(stale, 0, 10.0, 0.5) < load_score(stale, 3, 10.0, 0.5)  # … and its queue counts


# ---- the gate -------------------------------------------------------------------------------------


def test_gate_hysteresis_closes_above_spill_opens_below_return():
    gate = PoolGate("gpu", slo_s=0.100, spill_ratio=0.8, return_ratio=0.5, probe_interval_s=1.0)
    gate.update(0.079, now=0.0)
    assert gate.open
    gate.update(0.081, now=1.0)
    assert not gate.open and gate.transitions == 1
    for service in (0.079, 0.060, 0.051, 0.079):  # between the lines: stays closed, no flapping
        gate.update(service, now=2.0)
        assert not gate.open
    gate.update(0.049, now=3.0)
    assert gate.open and gate.transitions == 2
    for service in (0.051, 0.079, 0.060):  # between the lines: stays open
        gate.update(service, now=4.0)
        assert gate.open


def test_gate_probes_once_per_interval_while_closed():
    gate = PoolGate("gpu", slo_s=0.100, spill_ratio=0.8, return_ratio=0.5, probe_interval_s=1.0)
    assert not gate.probe_due(10.0)  # open: nothing to probe
    gate.update(1.0, now=10.0)
    assert not gate.probe_due(10.5)
    assert gate.probe_due(11.0)
    assert not gate.probe_due(11.5)
    assert gate.probe_due(12.1)


# ---- the router -----------------------------------------------------------------------------------


def slo_router(clock, slo_ms=100.0, costs=None, gpu=1, cpu=1, **routing):
    fleet = StandInFleet(
        gpu=[StandInBackend(f"gpu-{i}", "gpu") for i in range(gpu)],
        cpu=[StandInBackend(f"cpu-{i}", "cpu") for i in range(cpu)],
    )
    routes = {"m": ModelRoute(pools=("gpu", "cpu"), latency_slo_ms=slo_ms)}
    config = RoutingConfig(**{"probe_interval_s": 1.0, **routing})
    return fleet, Router(fleet, routes, rng=random.Random(1), config=config, pool_costs=costs, clock=clock)


def test_router_spills_when_the_preferred_pool_misses_and_returns_when_it_recovers():
    clock = Clock()
    fleet, router = slo_router(clock)
    gpu, cpu = fleet.pools["gpu"][0], fleet.pools["cpu"][0]
    assert router.choose("m", "1") == (gpu, PREFERRED)
    router.observe("m", "1", gpu, 0.005, 0)
    router.observe("m", "1", cpu, 0.030, 0)
    assert router.choose("m", "1") == (gpu, PREFERRED)

    clock.now += 2
    router.observe("m", "1", gpu, 0.400, 0)  # the GPU pool became slow: service > 0.8 × SLO
    assert router.choose("m", "1") == (cpu, SPILL)
    assert router.probe is None  # just measured: the first probe comes an interval after closing …
    clock.now += 1.1
    assert router.choose("m", "1") == (cpu, SPILL) and router.probe is gpu
    router.probe = None
    clock.now += 0.5
    assert router.choose("m", "1") == (cpu, SPILL) and router.probe is None  # … then once per interval
    clock.now += 0.6
    assert router.choose("m", "1") == (cpu, SPILL) and router.probe is gpu
    router.probe = None

    clock.now += 1
    router.observe("m", "1", gpu, 0.060, 0)  # better, but above the return line (0.5 × SLO): stays out
    assert router.choose("m", "1") == (cpu, SPILL)
    router.probe = None
    clock.now += 5
    router.observe("m", "1", gpu, 0.004, 0)  # recovered
    assert router.choose("m", "1") == (gpu, PREFERRED) and router.probe is None
    assert router.decisions[("gpu", PROBE)] == 3
    assert router.decisions[("cpu", SPILL)] == 5


def test_router_spills_single_requests_whose_queue_would_miss():
    clock = Clock()
    fleet, router = slo_router(clock)
    gpu, cpu = fleet.pools["gpu"][0], fleet.pools["cpu"][0]
    router.observe("m", "1", gpu, 0.020, 0)  # 20 ms a request: open, far below the spill line
    gpu.outstanding = 2  # 60 ms predicted: meets 80 ms
    assert router.choose("m", "1") == (gpu, PREFERRED)
    gpu.outstanding = 4  # 100 ms predicted: this request goes to the CPU pool; the pool stays open
    assert router.choose("m", "1") == (cpu, SPILL)
    assert router.placement()["m:1"]["pools"]["gpu"]["gate"] == "open"
    assert router.probe is None


def test_router_takes_the_fastest_predicted_when_no_pool_meets_the_objective():
    clock = Clock()
    fleet, router = slo_router(clock)
    gpu, cpu = fleet.pools["gpu"][0], fleet.pools["cpu"][0]
    router.observe("m", "1", gpu, 0.300, 0)
    router.observe("m", "1", cpu, 0.200, 0)
    assert router.choose("m", "1")[0] is cpu
    router.observe("m", "1", cpu, 0.900, 0)
    clock.now += 10
    router.observe("m", "1", cpu, 0.900, 0)
    assert router.choose("m", "1")[0] is gpu


def test_no_probe_copy_when_the_live_request_goes_to_the_closed_pool_itself():
    clock = Clock()
    fleet, router = slo_router(clock, cpu=0)  # one pool: nowhere to spill
    gpu = fleet.pools["gpu"][0]
    router.choose("m", "1")
    router.observe("m", "1", gpu, 0.400, 0)
    clock.now += 5
    assert router.choose("m", "1") == (gpu, PREFERRED)  # the fastest predicted, closed or not
    assert router.probe is None and ("gpu", PROBE) not in router.decisions


def test_router_spills_when_the_preferred_pool_has_no_healthy_backend():
    clock = Clock()
    fleet, router = slo_router(clock)
    gpu, cpu = fleet.pools["gpu"][0], fleet.pools["cpu"][0]
    gpu.healthy = False
    fleet.changed()
    assert router.choose("m", "1") == (cpu, SPILL)
    cpu.healthy = False
    fleet.changed()
    with pytest.raises(Unavailable):
        router.choose("m", "1")


def test_estimates_of_backends_that_left_the_fleet_are_forgotten():
    clock = Clock()
    fleet, router = slo_router(clock, gpu=2)
    leaving = fleet.pools["gpu"][1]
    router.observe("m", "1", leaving, 0.01, 0)
    assert any(address == leaving.address for _, _, _, address in router.service_times())
    fleet.pools["gpu"].remove(leaving)
    fleet.changed()
    assert not any(address == leaving.address for _, _, _, address in router.service_times())


def test_cheapest_pool_first_ties_keep_the_route_order():
    clock = Clock()
    fleet, router = slo_router(clock, costs={"gpu": 3.0, "cpu": 1.0})
    assert router.pools_of("m") == ("cpu", "gpu")
    assert router.choose("m", "1") == (fleet.pools["cpu"][0], PREFERRED)
    _, router = slo_router(clock, costs={"gpu": 1.0, "cpu": 1.0})
    assert router.pools_of("m") == ("gpu", "cpu")


def test_two_choices_favour_the_faster_backend_in_a_pool():
    clock = Clock()
    fleet, router = slo_router(clock, slo_ms=None, gpu=2)
    fast, slow = fleet.pools["gpu"]
    router.observe("m", "1", fast, 0.002, 0)
    router.observe("m", "1", slow, 0.020, 0)
    fast.outstanding, slow.outstanding = 3, 0  # 8 ms vs 20 ms predicted
    assert all(router.choose("m", "1")[0] is fast for _ in range(20))
    fast.outstanding = 12  # 26 ms vs 20 ms
    assert all(router.choose("m", "1")[0] is slow for _ in range(20))


def test_canary_and_shadow_decisions_are_counted_by_pool():
    clock = Clock()
    fleet, router = slo_router(clock)
    for backend in (*fleet.pools["gpu"], *fleet.pools["cpu"]):
        backend.models |= {("m", "2")}
    router.set_canaries("m", {"2"})
    assert router.choose("m", "2")[1] == CANARY
    assert router.choose("m", "1")[1] == PREFERRED
    assert router.choose_shadow("m", "2", "cpu") is fleet.pools["cpu"][0]
    assert router.decisions_by_reason()[SHADOW] == 1
    assert router.decisions_by_reason()[CANARY] == 1


def test_routing_config_refuses_a_return_line_above_the_spill_line():
    with pytest.raises(ConfigError, match="slo_return_ratio"):
        RoutingConfig(slo_spill_ratio=0.5, slo_return_ratio=0.6).validate("routing")


# ---- the split ------------------------------------------------------------------------------------


def request(model="m", version="", sticky=None):
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    if sticky is not None:
        message.parameters["tensorgate-sticky-key"].string_param = sticky
    return message


def test_split_draws_versions_by_weight():
    split = VersionSplit("m", {"1": 90, "2": 10}, "tensorgate-sticky-key", random.Random(7))
    assert split.stable == "1" and split.canaries == {"2"}
    n = 20_000
    for _ in range(n):
        split.pick(request(), None)
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(split.picked["2"] - n * 0.1) < 4 * sigma


def test_sticky_key_keeps_a_client_on_one_version_and_is_removed():
    split = VersionSplit("m", {"1": 50, "2": 50}, "tensorgate-sticky-key", random.Random(7))
    for key in ("alice", "bob", "carol", "dave"):
        versions = set()
        for _ in range(50):
            message = request(sticky=key)
            split.pick(message, None)
            versions.add(message.model_version)
            assert "tensorgate-sticky-key" not in message.parameters
        assert len(versions) == 1
    message = request()
    split.pick(message, Call(metadata=(("tensorgate-sticky-key", "alice"),)))  # the header works the same
    by_param = request(sticky="alice")
    split.pick(by_param, None)
    assert message.model_version == by_param.model_version


def test_a_growing_canary_only_gains_keys():
    keys = [f"user-{i}" for i in range(2000)]
    previous = set()
    for share in (5, 25, 50, 100):
        split = VersionSplit("m", {"1": 100 - share, "2": share}, "tensorgate-sticky-key")
        on_canary = {k for k in keys if split.version_at(key_fraction(k)) == "2"}
        assert previous <= on_canary
        assert abs(len(on_canary) - len(keys) * share / 100) < 4 * math.sqrt(len(keys) * 0.25) + 1
        previous = on_canary


def test_a_request_naming_its_version_keeps_it():
    split = VersionSplit("m", {"1": 0, "2": 1}, "tensorgate-sticky-key")
    message = request(version="1", sticky="x")
    split.pick(message, None)
    assert message.model_version == "1" and "tensorgate-sticky-key" not in message.parameters


@pytest.mark.parametrize("weights", [{}, {"1": -1}, {"1": 0}, {"x": 1}])
def test_split_refuses_what_is_not_a_split(weights):
    with pytest.raises(ConfigError):
        VersionSplit("m", weights, "k")


# ---- the mirror -----------------------------------------------------------------------------------


class SlowBackend(StandInBackend):
    def __init__(self, fail: bool = False) -> None:
        super().__init__("slow", "cpu")
        self.release = asyncio.Event()
        self.fail = fail

    async def infer(self, request):
        self.received.append(request)
        await self.release.wait()
        if self.fail:
            raise Unavailable("shadow down")
        return pb.ModelInferResponse(model_name=request.model_name)


def test_mirror_is_bounded_counts_drops_and_keeps_errors_to_itself():
    async def scenario():
        backend = SlowBackend(fail=True)
        mirror = Mirror(max_in_flight=2)
        answers = []
        original = request(version="1")
        sent = [mirror.send(backend, original, 1.0, lambda *a: answers.append(a), version="3") for _ in range(5)]
        assert sent == [True, True, False, False, False]
        assert mirror.dropped == 3 and mirror.in_flight == 2
        await asyncio.sleep(0)
        assert backend.received[0].model_version == "3" and original.model_version == "1"
        assert backend.received[0].parameters["timeout"].int64_param == 1_000_000
        assert "timeout" not in original.parameters
        backend.release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(answers) == 2 and all(isinstance(a[4], Unavailable) for a in answers)
        assert mirror.failed == 2 and mirror.in_flight == 0
        await mirror.close()

    asyncio.run(scenario())


# ---- the output comparison ------------------------------------------------------------------------


def response_of(values: np.ndarray, name: str = "OUTPUT0") -> object:
    response = pb.ModelInferResponse(model_name="m")
    tensor = response.outputs.add(name=name, datatype="FP32", shape=list(values.shape))
    response.raw_output_contents.append(values.astype(np.float32).tobytes())
    assert tensor.name == name
    return response


def test_output_comparison_learns_edges_from_the_reference_and_compares_each_side():
    rng = np.random.default_rng(0)
    comparison = OutputComparison("", bins=10, learn_values=500, reference="1")
    comparison.add("2", response_of(rng.normal(3.0, 1.0, 100)))  # before the edges: waits, then counted
    assert comparison.summary()["learning"]
    for _ in range(10):
        comparison.add("1", response_of(rng.normal(0.0, 1.0, 100)))
        comparison.add("same", response_of(rng.normal(0.0, 1.0, 100)))
    summary = comparison.summary()
    assert not summary["learning"] and summary["reference"] == "1"
    assert sum(summary["counts"]["1"]) == 1000 and sum(summary["counts"]["2"]) == 100
    assert summary["compared"]["2"]["ks"] > 0.8
    assert summary["compared"]["same"]["ks"] < 0.1
    comparison.add("1", pb.ModelInferResponse(model_name="m"))  # no such output: counted apart
    assert comparison.summary()["unreadable"] == 1
