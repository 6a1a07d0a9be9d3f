"""The resilience parts on their own, with stand-ins and a fake clock: retry budget, the retry rule,
outlier ejection and re-admission, admission gates. The same behaviour against real Tritons and the
real gateway is in tests/test_resilience.py."""

from __future__ import annotations

import grpc
import pytest

from gateway.config import config_from_mapping
from gateway.errors import Abandoned, ConfigError, ResourceExhausted, Unavailable
from gateway.pipeline.admission import Admission, Gate
from gateway.pipeline.config import AdmissionConfig, ModelLimits
from gateway.pipeline.exchange import ModelEntry
from gateway.routing.retry_budget import RetryBudget
from gateway.upstream.backend import Health
from gateway.upstream.config import OutlierConfig
from gateway.upstream.outlier import STALL, OutlierDetector
from tests.test_routing_units import StandInBackend, dispatcher_over, exchange_for, signature


# ---- retry budget --------------------------------------------------------------------------------

def test_retry_budget_allows_its_ratio_of_requests_plus_a_minimum_rate():
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=lambda: now[0])
    assert budget.withdraw() and not budget.withdraw()  # the starting minimum (1) is spent
    budget.requests += 100  # a hundred first attempts: twenty retries
    allowed = sum(budget.withdraw() for _ in range(50))
    assert allowed == 20 and budget.refused == 31
    now[0] = 3.0  # three quiet seconds: three more at the minimum rate
    assert sum(budget.withdraw() for _ in range(10)) == 3


def test_retry_budget_cannot_be_saved_up_over_a_quiet_spell():
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=lambda: now[0])
    now[0] = 3600.0  # an hour of nothing
    assert sum(budget.withdraw() for _ in range(100)) == 10  # capped at window_s × min_per_s


# ---- the retry rule --------------------------------------------------------------------------------

async def test_dispatcher_tries_at_most_max_attempts_each_on_another_backend():
    backends = [StandInBackend(f"{n}:1", "p", fail_with=Unavailable(f"{n} is gone")) for n in "abcd"]
    dispatcher = dispatcher_over(*backends)
    with pytest.raises(Unavailable):
        await dispatcher.infer(exchange_for(ModelEntry("m", "1", signature())), None)
    tried = [b for b in backends if b.received]
    assert len(tried) == 3 and all(len(b.received) == 1 for b in tried)  # three attempts, three backends
    assert dispatcher.retries == 2


async def test_dispatcher_retries_only_within_the_budget_but_always_fails_over_abandoned_requests():
    gone = StandInBackend("a:1", "p", fail_with=Unavailable("gone"))
    spare = StandInBackend("b:1", "p")
    spare.outstanding = 100  # p2c always picks `gone` first
    dispatcher = dispatcher_over(gone, spare)
    dispatcher.budget = RetryBudget(ratio=0.0, min_per_s=0.0)
    with pytest.raises(Unavailable):
        await dispatcher.infer(exchange_for(ModelEntry("m", "1", signature())), None)
    assert dispatcher.retries_refused == 1 and not spare.received
    gone.fail_with = Abandoned("a:1 was ejected while the request waited on it")
    response = await dispatcher.infer(exchange_for(ModelEntry("m", "1", signature())), None)
    assert response.id == "b:1" and dispatcher.failovers == 1


# ---- outlier ejection ------------------------------------------------------------------------------

class EjectableStandIn(StandInBackend):
    """A StandInBackend with what the outlier detector reads and writes of a Backend."""

    def __init__(self, address: str, pool: str = "p") -> None:
        super().__init__(address, pool)
        self.health = Health.HEALTHY
        self.ejected = False
        self.consecutive_failures = 0
        self.failure_limit = 0
        self.on_outlier = None
        self.checked_ok_at = 0.0
        self.failed_checks = 0
        self.served = self.failed = 0
        self.abandoned = 0

    def abandon_pending(self, reason: str) -> int:
        self.abandoned += self.outstanding
        count, self.outstanding = self.outstanding, 0
        return count


def detector_over(*backends, now, **config) -> tuple[OutlierDetector, list]:
    changes = []
    pools = {}
    for backend in backends:
        pools.setdefault(backend.pool, []).append(backend)
    detector = OutlierDetector(OutlierConfig(**config), pools, lambda: changes.append(1), clock=lambda: now[0])
    return detector, changes


def test_a_stalled_backend_is_ejected_its_pending_requests_failed_over_and_readmitted_after_a_good_check():
    now = [0.0]
    hung, fine = EjectableStandIn("a:1"), EjectableStandIn("b:1")
    detector, changes = detector_over(hung, fine, now=now, stall_after_s=0.5, base_ejection_s=1.0)
    hung.outstanding = 3
    detector.sweep()
    now[0] = 0.4
    detector.sweep()
    assert not hung.ejected  # not yet stalled long enough
    fine.outstanding, fine.served = 5, 10  # busy but answering: never a stall
    now[0] = 0.6
    detector.sweep()
    assert not hung.ejected  # no answer, but it answers its health checks: a long request
    hung.failed_checks = 1
    detector.sweep()
    assert hung.ejected and not fine.ejected and hung.abandoned == 3 and changes
    assert detector.ejections_by_reason[STALL] == 1 and detector.requests_failed_over == 3
    now[0] = 1.7
    detector.sweep()
    assert hung.ejected  # the ejection is over, but no health check has passed since
    hung.checked_ok_at = 1.65
    detector.sweep()
    assert not hung.ejected and detector.readmissions == 1


def test_ejections_grow_exponentially_and_the_pool_cap_holds():
    now = [0.0]
    pool = [EjectableStandIn(f"{n}:1") for n in "abcd"]
    detector, _ = detector_over(*pool, now=now, base_ejection_s=1.0, max_ejection_s=8.0, max_ejected_percent=50)
    a, b, c, _ = pool
    assert detector.eject(a, "test", "x") and detector.eject(b, "test", "x")
    assert not detector.eject(c, "test", "x") and detector.ejections_refused == 1  # 2 of 4 is the cap
    lengths = []
    for _ in range(5):  # ejected again right after each readmission: 1, 2, 4, 8, 8 s
        began = now[0]
        a.checked_ok_at = 1e9
        while a.ejected:
            now[0] += 0.25
            detector.sweep()
        lengths.append(now[0] - began)
        detector.eject(a, "test", "again")
    assert lengths == [1.0, 2.0, 4.0, 8.0, 8.0], lengths


def test_consecutive_failures_eject_through_the_backend_hook():
    now = [0.0]
    backend, other = EjectableStandIn("a:1"), EjectableStandIn("b:1")
    detector, _ = detector_over(backend, other, now=now, consecutive_failures=3)
    assert backend.failure_limit == 3
    backend.on_outlier(backend, "3 failures in a row")
    assert backend.ejected and detector.ejections_by_reason["consecutive_failures"] == 1


# ---- admission ---------------------------------------------------------------------------------------

def test_gate_refuses_over_its_limits_with_pushback_and_counts_back_down():
    gate = Gate("model 'm'", max_inflight=2, max_bytes=100, pushback_ms=30)
    gate.admit(60)
    with pytest.raises(ResourceExhausted) as refused:
        gate.admit(50)  # 110 bytes > 100
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.trailers == (("grpc-retry-pushback-ms", "30"),)
    gate.admit(40)
    with pytest.raises(ResourceExhausted, match="2 requests in flight, the limit is 2"):
        gate.admit(0)
    gate.release(60)
    gate.release(40)
    assert (gate.inflight, gate.held_bytes, gate.shed) == (0, 0, 2)
    gate.admit(500)  # larger than the limit, but nothing else is held: admitted
    assert gate.held_bytes == 500


def test_admission_config_per_model_limits_and_validation():
    admission = Admission(AdmissionConfig(model_default=ModelLimits(max_inflight=5),
                                          models={"big": ModelLimits(max_request_bytes=4096)}))
    assert admission.gate_of("any").max_inflight == 5 and admission.gate_of("big").max_bytes == 4096
    assert admission.gate_of("any") is admission.gate_of("any")
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                                  "admission": {"max_request_bytes": 1 << 20, "models": {"m": {"max_inflight": 3}}}})
    assert config.admission.limits_of("m").max_inflight == 3
    with pytest.raises(ConfigError, match=r"admission.models.m.max_inflight"):
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                             "admission": {"models": {"m": {"max_inflight": 0}}}})
    with pytest.raises(ConfigError, match=r"outlier.max_ejected_percent"):
        config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:1"]}},
                             "outlier": {"max_ejected_percent": 101}})


def test_a_stalled_backend_with_nowhere_to_move_its_requests_is_left_in_place():
    now = [0.0]
    lone, down = EjectableStandIn("a:1"), EjectableStandIn("b:1")
    down.healthy = False  # the other backend is out of rotation
    detector, _ = detector_over(lone, down, now=now, stall_after_s=0.5)
    lone.outstanding, lone.failed_checks = 4, 1
    detector.sweep()
    now[0] = 1.0
    detector.sweep()
    assert not lone.ejected and lone.abandoned == 0
