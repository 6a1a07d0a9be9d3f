"""Unit tests of the routing stage with stand-in backends: the router, the sequence table and the
direct dispatcher's pick, stickiness, retry and deadline handling. The same behaviour is tested
end to end against real Tritons in test_failover.py and test_stateful_and_decoupled.py; these pin
down the rules themselves, fast and deterministically."""

from __future__ import annotations

import random

import grpc
import pytest

from gateway.errors import BackendError, NotFound, Unavailable
from gateway.pipeline.exchange import Exchange, ModelEntry
from gateway.protocol import pb
from gateway.protocol.tensors import ModelSignature
from gateway.routing.config import ModelRoute
from gateway.routing.dispatcher import DEFAULT_SEQUENCE_IDLE_S, DirectDispatcher, sequence_of
from gateway.routing.router import FAILOVER, PREFERRED, SPILL, STICKY, Router
from gateway.routing.sequences import SequenceTable


class StandInBackend:
    """What the router and dispatcher read of a Backend, and a scripted `infer`."""

    def __init__(self, address: str, pool: str, models=(("m", "1"), ("m", "")), fail_with=None) -> None:
        self.address, self.pool = address, pool
        self.healthy = True
        self.outstanding = 0
        self.models = set(models)
        self.fail_with = fail_with
        self.received: list = []

    @property
    def routable(self) -> bool:  # not ejected: the stand-ins are ejected only by health here
        return self.healthy

    def serves(self, model: str, version: str) -> bool:
        return (model, version) in self.models

    async def infer(self, request):
        self.received.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        return pb.ModelInferResponse(model_name=request.model_name, id=self.address)

    def __repr__(self) -> str:
        return f"<StandIn {self.address}>"


class StandInFleet:
    def __init__(self, **pools) -> None:
        self.pools = pools
        self._listeners = []

    def on_change(self, listener) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            listener()


def signature(sequence: bool = False, idle_s: float | None = None) -> ModelSignature:
    return ModelSignature("m", "1", {}, {}, 8, False, sequence, idle_s)


def exchange_for(entry: ModelEntry, **parameters) -> Exchange:
    request = pb.ModelInferRequest(model_name="m")
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = value
    return Exchange(entry, request, 0)


# ---- Router ------------------------------------------------------------------------------------

def test_router_prefers_the_first_pool_and_spills_to_the_next():
    gpu, cpu = StandInBackend("gpu:1", "gpu"), StandInBackend("cpu:1", "cpu")
    fleet = StandInFleet(gpu=[gpu], cpu=[cpu])
    router = Router(fleet, {"m": ModelRoute(pools=("gpu", "cpu"))}, rng=random.Random(0))
    assert router.choose("m", "1") == (gpu, PREFERRED)
    gpu.healthy = False
    fleet.changed()  # candidate tables are rebuilt only on a fleet change
    assert router.choose("m", "1") == (cpu, SPILL)
    assert router.decisions == {("gpu", PREFERRED): 1, ("cpu", SPILL): 1}


def test_router_failover_excludes_the_backend_that_failed():
    first, second = StandInBackend("a:1", "p"), StandInBackend("b:1", "p")
    router = Router(StandInFleet(p=[first, second]), None, rng=random.Random(0))
    assert router.choose("m", "1", exclude=first) == (second, FAILOVER)
    with pytest.raises(Unavailable, match="other than the one that just failed"):
        Router(StandInFleet(p=[first]), None).choose("m", "1", exclude=first)


def test_router_power_of_two_choices_picks_the_less_loaded():
    busy, idle = StandInBackend("busy:1", "p"), StandInBackend("idle:1", "p")
    busy.outstanding = 10
    router = Router(StandInFleet(p=[busy, idle]), None, rng=random.Random(1))
    assert {router.choose("m", "1")[0] for _ in range(20)} == {idle}


def test_router_refuses_unrouted_models_and_models_nobody_serves():
    backend = StandInBackend("a:1", "p")
    router = Router(StandInFleet(p=[backend]), {"m": ModelRoute(pools=("p",))})
    assert not router.routes("other")
    with pytest.raises(NotFound):
        router.choose("other", "")
    backend.healthy = False
    with pytest.raises(Unavailable, match=r"no healthy backend can serve it now") as error:
        router.choose("m", "1")
    assert error.value.detail == "pools [p]"  # logged; pool names are not the client's business


def test_router_reports_the_configured_sequence_idle_timeout():
    router = Router(StandInFleet(p=[]), {"m": ModelRoute(pools=("p",), sequence_idle_timeout_s=2.5),
                                         "n": ModelRoute(pools=("p",))})
    assert router.sequence_idle_timeout_s("m") == 2.5
    assert router.sequence_idle_timeout_s("n") is None
    assert Router(StandInFleet(p=[]), None).sequence_idle_timeout_s("m") is None


# ---- SequenceTable -----------------------------------------------------------------------------

def test_sequence_table_binds_until_end_or_idle_timeout():
    now = [0.0]
    table = SequenceTable(clock=lambda: now[0])
    backend = StandInBackend("a:1", "p")
    table.bind("m", 7, backend, idle_s=1.0)
    now[0] = 0.9
    assert table.lookup("m", 7) is backend  # a lookup refreshes the idle clock
    now[0] = 1.8
    assert table.lookup("m", 7) is backend
    now[0] = 2.9
    assert table.lookup("m", 7) is None and len(table) == 0
    table.bind("m", 8, backend, idle_s=1.0)
    table.end("m", 8)
    assert table.lookup("m", 8) is None
    table.bind("m", 9, backend, idle_s=1.0)
    table.bind("m", 10, backend, idle_s=5.0)
    now[0] = 5.0
    assert table.expire() == 1 and len(table) == 1


# ---- DirectDispatcher ---------------------------------------------------------------------------

def test_sequence_of_reads_every_id_kind():
    request = pb.ModelInferRequest()
    assert sequence_of(request) is None
    request.parameters["sequence_id"].string_param = "abc"
    request.parameters["sequence_start"].bool_param = True
    assert sequence_of(request) == ("abc", True, False)
    request.parameters["sequence_id"].uint64_param = 9
    request.parameters["sequence_end"].bool_param = True
    assert sequence_of(request) == (9, True, True)


def dispatcher_over(*backends, retry=True, routes=None, now=None) -> DirectDispatcher:
    pools = {}
    for backend in backends:
        pools.setdefault(backend.pool, []).append(backend)
    clock = (lambda: now[0]) if now is not None else None
    router = Router(StandInFleet(**pools), routes, rng=random.Random(0))
    kwargs = {"clock": clock} if clock else {}
    return DirectDispatcher(router, SequenceTable(**kwargs), retry, **kwargs)


async def test_dispatcher_retries_once_elsewhere_on_unavailable():
    broken = StandInBackend("a:1", "p", fail_with=Unavailable("a:1 is gone"))
    good = StandInBackend("b:1", "p")
    dispatcher = dispatcher_over(broken, good)
    entry = ModelEntry("m", "1", signature())
    for _ in range(6):  # whichever p2c picks first, the request is answered by the good backend
        exchange = exchange_for(entry)
        response = await dispatcher.infer(exchange, None)
        assert response.id == "b:1" and exchange.backend is good
    assert broken.received, "p2c never picked the broken backend: the retry path was not exercised"
    assert exchange.route in (PREFERRED, FAILOVER)


async def test_dispatcher_does_not_retry_other_errors_or_when_told_not_to():
    wrong = StandInBackend("a:1", "p", fail_with=BackendError(grpc.StatusCode.INVALID_ARGUMENT, "bad"))
    other = StandInBackend("b:1", "p", models=())
    with pytest.raises(BackendError):
        await dispatcher_over(wrong, other).infer(exchange_for(ModelEntry("m", "1", signature())), None)
    gone = StandInBackend("a:1", "p", fail_with=Unavailable("gone"))
    spare = StandInBackend("b:1", "p")
    spare.outstanding = 100  # p2c always picks `gone` first
    with pytest.raises(Unavailable):
        await dispatcher_over(gone, spare, retry=False).infer(exchange_for(ModelEntry("m", "1", signature())), None)
    assert not spare.received


async def test_dispatcher_does_not_retry_past_the_deadline_and_sends_the_rest_as_timeout():
    now = [100.0]
    gone = StandInBackend("a:1", "p", fail_with=Unavailable("gone"))
    spare = StandInBackend("b:1", "p")
    spare.outstanding = 100
    dispatcher = dispatcher_over(gone, spare, now=now)
    exchange = exchange_for(ModelEntry("m", "1", signature()))
    with pytest.raises(Unavailable):
        await dispatcher.infer(exchange, deadline=100.0005)  # under a millisecond left: no retry
    assert not spare.received
    assert exchange.request.parameters["timeout"].int64_param == 500  # µs left, carried to Triton


async def test_sequences_stick_to_their_backend_and_never_fail_over_mid_sequence():
    first, second = StandInBackend("a:1", "p"), StandInBackend("b:1", "p")
    dispatcher = dispatcher_over(first, second)
    entry = ModelEntry("m", "1", signature(sequence=True))
    start = exchange_for(entry, sequence_id=42, sequence_start=True)
    await dispatcher.infer(start, None)
    bound = start.backend
    middle = exchange_for(entry, sequence_id=42)
    await dispatcher.infer(middle, None)
    assert middle.backend is bound and middle.route == STICKY
    bound.fail_with = Unavailable("gone")
    with pytest.raises(Unavailable):  # the sequence's state lives there: no retry elsewhere
        await dispatcher.infer(exchange_for(entry, sequence_id=42), None)
    bound.healthy = False
    with pytest.raises(Unavailable, match="start the sequence again"):
        await dispatcher.infer(exchange_for(entry, sequence_id=42), None)
    assert dispatcher.sequences.lookup("m", 42) is None


def test_sequence_idle_timeout_comes_from_config_then_model_then_default():
    routes = {"m": ModelRoute(pools=("p",), sequence_idle_timeout_s=3.0)}
    backend = StandInBackend("a:1", "p")
    assert dispatcher_over(backend, routes=routes).sequence_idle_s(ModelEntry("m", "1", signature(True, 7.0))) == 3.0
    assert dispatcher_over(backend).sequence_idle_s(ModelEntry("m", "1", signature(True, 7.0))) == 7.0
    assert dispatcher_over(backend).sequence_idle_s(ModelEntry("m", "1", signature(True))) == DEFAULT_SEQUENCE_IDLE_S


async def test_configured_sequence_idle_timeout_expires_the_binding():
    now = [0.0]
    backend = StandInBackend("a:1", "p")
    dispatcher = dispatcher_over(backend, routes={"m": ModelRoute(pools=("p",), sequence_idle_timeout_s=2.0)}, now=now)
    entry = ModelEntry("m", "1", signature(True, 60.0))
    await dispatcher.infer(exchange_for(entry, sequence_id=5, sequence_start=True), None)
    now[0] = 1.5
    assert dispatcher.sequences.lookup("m", 5) is backend
    now[0] = 3.6
    assert dispatcher.sequences.lookup("m", 5) is None  # the config's 2 s, not the model's 60 s
