"""The telemetry stage: OpenTelemetry metrics for the gateway, exported to Prometheus and/or OTLP.

The hot path never calls the SDK. `observer` (a Pipeline observer) and `refusal_observer` bump
local counters (gateway/telemetry/aggregates.py); `drift_hook` counts drift alerts. At collection:

    tensorgate.requests                 counter    {request}  model, version, pool, backend, rpc.response.status_code
    tensorgate.errors                   counter    {request}  the same, status != OK only
    tensorgate.request.duration         histogram  s          the same (arrival → response, in the gateway)
    tensorgate.backend.duration         histogram  s          model, version, pool, backend (the backend call)
    tensorgate.batching.queue.duration  histogram  s          model, version (time waiting for a batch)
    tensorgate.batch.size               histogram  {row}      model, version (rows per batch sent upstream)
    tensorgate.batching.queue.depth     gauge      {request}  model, version (waiting now)
    tensorgate.backend.inflight         gauge      {request}  backend, pool
    tensorgate.backend.healthy          gauge      1          backend, pool (1 in rotation, 0 out:
                                                              unhealthy or ejected)
    tensorgate.routing.decisions        counter    {decision} pool, reason (preferred, spill, failover, canary,
                                                              shadow, probe)
    tensorgate.shadow.copies            counter    {copy}     model, outcome (sent, dropped, failed, unplaced)
    tensorgate.placement.service_time   gauge      s          model, version, pool, backend (the router's EWMA)
    tensorgate.retries                  counter    {attempt}  kind: retry (charged to the retry budget),
                                                              failover (moved off an ejected backend),
                                                              refused (by the budget), hedge
    tensorgate.backend.ejections        counter    {ejection} reason: consecutive_failures, stall,
                                                              refused_by_cap; readmission
    tensorgate.shed                     counter    {request}  model (`_gateway`: the gateway's own limits):
                                                              refused by admission (RESOURCE_EXHAUSTED)
    tensorgate.drift.statistic          gauge      1          model, tensor, feature, statistic (last window;
                                                              also effect_size: the mean shift in reference
                                                              SDs, and p_<test>: the calibrated tests' p-values)
    tensorgate.drift.alerts             counter    {alert}    model, tensor, statistic, level
    tensorgate.drift.observations       histogram  1          model, tensor, feature (values counted in the
                                                              drift bins since the reference was set)

Counters and gauges are observable instruments (callbacks yield Observations). The SDK (1.45) has no
MetricProducer and no observable histogram, so the histograms are added to each collection by the
readers below (`_receive_metrics`, the seam every MetricReader implements) as cumulative data:
explicit buckets for Prometheus, explicit or exponential (`otlp_histogram`) for OTLP.
Durations are per inference request (one of many on a ModelStreamInfer stream), not per gRPC call,
hence tensorgate.* names rather than the semantic conventions' rpc.server.call.duration; the status
attribute follows them (`rpc.response.status_code`). Requests refused before reaching the pipeline's
dispatch (unknown model, invalid tensors) count with pool and backend empty; a model name
(or version) the fleet does not know is reported as `_unknown`, so clients cannot mint new series.

Exporters run off the event loop: Prometheus in prometheus_client's HTTP server thread, OTLP in
the PeriodicExportingMetricReader's thread; a collector that is down never slows a request.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.telemetry.aggregates import OK, UNKNOWN, RequestAggregates, SeriesSnapshot
from gateway.telemetry.config import TelemetryConfig
from gateway.telemetry.histogram import DURATION_BOUNDS_S, DURATION_FIRST_INDEX, explicit_point, exponential_point

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("tensorgate")


def _retrying(read: Callable[[], Iterable[Observation]]) -> list[Observation]:
    """Read gateway state from an exporter thread: a dict resized under us is simply read again."""
    for attempt in range(3):
        try:
            return list(read())
        except RuntimeError:  # "dictionary changed size during iteration"
            if attempt == 2:
                raise
    return []


class _Producing:
    """Mixin for MetricReaders: append the stage's own metrics (the histogram) to each collection."""

    _produce: Callable[[bool], list[Metric]]
    _resource: Resource
    _exponential = False  # explicit buckets unless the reader's consumer merges exponential ones

    def produce_with(self, produce: Callable[[bool], list[Metric]], resource: Resource, exponential: bool) -> "_Producing":
        """Append `produce(exponential)`'s metrics to every collection, under `resource` when the
        SDK collected nothing of its own."""
        self._produce, self._resource, self._exponential = produce, resource, exponential
        return self

    def _receive_metrics(self, metrics_data: MetricsData | None, timeout_millis: float = 10_000, **kwargs) -> None:
        try:
            extra = self._produce(self._exponential)
        except Exception:
            log.exception("telemetry: producing the request histogram failed")
            extra = []
        if extra:
            resources = list(metrics_data.resource_metrics) if metrics_data is not None else []
            if resources:
                first = resources[0]
                # Join the SDK's own ScopeMetrics of the same scope: the OTLP encoder keys scopes by
                # identity, so a second ScopeMetrics("tensorgate") would replace the first.
                scopes = list(first.scope_metrics)
                for index, existing in enumerate(scopes):
                    if existing.scope == SCOPE:
                        scopes[index] = ScopeMetrics(SCOPE, [*existing.metrics, *extra], existing.schema_url)
                        break
                else:
                    scopes.append(ScopeMetrics(scope=SCOPE, metrics=extra, schema_url=""))
                resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
            else:
                resources = [ResourceMetrics(self._resource, [ScopeMetrics(scope=SCOPE, metrics=extra, schema_url="")], "")]
            metrics_data = MetricsData(resource_metrics=resources)
        super()._receive_metrics(metrics_data, timeout_millis=timeout_millis, **kwargs)


def _prometheus_reader_class():
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    class _PrometheusReader(_Producing, PrometheusMetricReader):
        pass

    return _PrometheusReader


class _PeriodicReader(_Producing, PeriodicExportingMetricReader):
    pass


def _nothing() -> list:
    return []


@dataclass(frozen=True)
class GatewayView:
    """What the telemetry stage may read of the rest of the gateway, as functions gateway/app.py
    binds to the stages that own the state. Each is called from exporter threads at collection
    (and `routes`/`known_models` on refusals): they must only read. The defaults read nothing, for a
    stage used alone."""

    backends: Callable[[], list] = _nothing
    """Every upstream Backend (address, pool, healthy, outstanding): Fleet.backends."""
    known_models: Callable[[], set] = set
    """(model, version) pairs some backend serves: Fleet.known_models."""
    routes: Callable[[str], bool] = lambda model: True
    """Whether the gateway routes a model: Router.routes."""
    routing_decisions: Callable[[], dict] = dict
    """{(pool, reason): backends picked}: a copy of Router.decisions."""
    batched_models: Callable[[], list] = _nothing
    """BatchedModel rows (model, version, counters, waiting): BatchingDispatcher.batched_models."""
    drift_monitors: Callable[[], dict] = dict
    """{model: ModelMonitor}: DriftStage.monitors."""
    resilience: Callable[[], dict] = dict
    """{"retries": {kind: n}, "ejections": {reason: n}, "shed": {model: n}} (model '' = the gateway's
    own limits): the dispatcher's, outlier detector's and admission's counters."""
    shadow_copies: Callable[[], dict] = dict
    """{(model, outcome): copies} of the shadows (outcome: sent, dropped, failed, unplaced): TrafficStage.shadow_copies."""
    service_times: Callable[[], dict] = dict
    """{(model, version, pool, backend): seconds}: the router's EWMA service time per request in line."""


#: Batch size bounds, rows: 1, 2, 4, ... 32768 (Triton's max_batch_size rarely exceeds a few thousand).
BATCH_ROW_BOUNDS = tuple(float(2**k) for k in range(16))


class TelemetryStage:
    """Metrics of one gateway. `observer` goes in Pipeline.observers, `refusal_observer` in
    Pipeline.refusal_observers, `drift_hook` in DriftStage.hooks."""

    def __init__(self, config: TelemetryConfig, view: GatewayView | None = None, *, aggregates=None,
                 export_metrics: bool = True) -> None:
        """`aggregates`: what the request histograms are read from (RequestAggregates by default;
        the merged workers' in the parent of several, gateway/workers/). `export_metrics` False: keep
        the aggregates for another process to export (a worker of several); no endpoint, no OTLP
        metrics (traces still go to OTLP)."""
        self.config = config
        self.view = view or GatewayView()
        self.aggregates = RequestAggregates() if aggregates is None else aggregates
        self.export_metrics = export_metrics
        self.drift_alerts: dict[tuple[str, str, str, str], int] = {}
        self.observe_errors = 0
        self.prometheus_port: int | None = None
        self._start_ns = time.time_ns()
        self._resource = Resource.create({"service.name": config.service_name})
        self._readers: list[MetricReader] = []
        self._http_server = None
        self._provider: MeterProvider | None = None
        self.tracing = None
        if config.tracing:
            from gateway.telemetry.tracing import Tracing

            self.tracing = Tracing(config, self._resource)

    def __repr__(self) -> str:
        return f"<TelemetryStage {self.aggregates!r} prometheus_port={self.prometheus_port} otlp={self.config.otlp_endpoint!r}>"

    # -- hot path ---------------------------------------------------------------------------

    def _failed(self, what: str) -> None:
        self.observe_errors += 1
        if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
            log.exception("telemetry %s failed (%d times)", what, self.observe_errors)

    def observer(self, exchange, response, error) -> None:
        """Pipeline observer: a dict lookup and a few int increments per histogram."""
        try:
            self.aggregates.record(exchange, OK if error is None else error.code)
        except Exception:  # metrics must never fail the request they count
            self._failed("observer")

    def refusal_observer(self, model: str, version: str, error, elapsed_ns: int) -> None:
        """Pipeline refusal observer: requests refused before admission count as errors too, under
        their model and version only when the fleet knows them — client-chosen names must not
        mint new series — else under `_unknown`."""
        try:
            known = self.view.known_models()
            if not self.view.routes(model) or not any(name == model for name, _ in known):
                model, version = UNKNOWN, ""
            elif version and (model, version) not in known:
                version = UNKNOWN
            self.aggregates.record_refusal(model, version, error.code, elapsed_ns)
        except Exception:
            self._failed("refusal observer")

    def drift_hook(self, alert: dict) -> None:
        """DriftStage hook: count alerts by model, tensor, statistic and level."""
        key = (str(alert.get("model")), str(alert.get("tensor")), str(alert.get("statistic")), str(alert.get("level")))
        self.drift_alerts[key] = self.drift_alerts.get(key, 0) + 1

    # -- collection (exporter threads) -----------------------------------------------------

    def _requests(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.count, s.attributes) for s in self.aggregates.snapshot()]

    def _errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.count, s.attributes) for s in self.aggregates.snapshot() if s.failed]

    def _backends(self) -> list:
        return _retrying(self.view.backends)

    def _backend_healthy(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if b.routable else 0, {"backend": b.address, "pool": b.pool}) for b in self._backends()]

    def _backend_inflight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.outstanding, {"backend": b.address, "pool": b.pool}) for b in self._backends()]

    def _routing_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"pool": pool, "reason": reason})
                for (pool, reason), count in _retrying(lambda: self.view.routing_decisions().items())]

    def _resilience(self, key: str, attribute: str) -> list[Observation]:
        counts = _retrying(lambda: (self.view.resilience().get(key) or {}).items())
        return [Observation(count, {attribute: name or "_gateway"}) for name, count in counts]

    def _retries(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._resilience("retries", "kind")

    def _ejections(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._resilience("ejections", "reason")

    def _shed(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._resilience("shed", "model")

    def _shadow_copies(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"model": model, "outcome": outcome})
                for (model, outcome), count in _retrying(lambda: self.view.shadow_copies().items())]

    def _service_times(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(seconds, {"model": model, "version": version, "pool": pool, "backend": backend})
                for (model, version, pool, backend), seconds in _retrying(lambda: self.view.service_times().items())]

    def _batching(self) -> list[tuple[dict, object, int]]:
        """(attributes, BatchCounters, requests waiting) of every batched model version."""
        return [({"model": name, "version": version}, counters, waiting)
                for name, version, counters, waiting in _retrying(self.view.batched_models)]

    def _queue_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(waiting, attributes) for attributes, _, waiting in self._batching()]

    def _monitors(self) -> list:
        return list(self.view.drift_monitors().items())

    def _drift_statistics(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for model, monitor in self._monitors():
            report = monitor.last_report
            for feature in (report or {}).get("features", ()):
                labels = {"model": model, "tensor": feature["tensor"], "feature": str(feature["feature"])}
                for statistic, value in feature["statistics"].items():
                    out.append(Observation(value, {**labels, "statistic": statistic}))
                out.append(Observation(feature.get("effect_size", math.nan), {**labels, "statistic": "effect_size"}))
                for test, value in feature.get("p_values", {}).items():
                    out.append(Observation(value, {**labels, "statistic": f"p_{test}"}))
        return out

    def _drift_alert_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"model": m, "tensor": t, "statistic": s, "level": level})
            for (m, t, s, level), count in list(self.drift_alerts.items())
        ]

    # -- histograms, built at collection ----------------------------------------------------

    def _duration_metric(self, name: str, description: str, series: list[SeriesSnapshot], exponential: bool,
                         now: int) -> list[Metric]:
        if exponential:
            points = [exponential_point(s.attributes, s.bucket_counts, s.sum_s, s.min_s, s.max_s,
                                        DURATION_FIRST_INDEX, self._start_ns, now) for s in series if s.count]
            data = ExponentialHistogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        else:
            points = [explicit_point(s.attributes, s.bucket_counts, s.sum_s, s.min_s, s.max_s, DURATION_BOUNDS_S,
                                     self._start_ns, now) for s in series if s.count]
            data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return [Metric(name=name, description=description, unit="s", data=data)] if points else []

    def _batch_size_metric(self, now: int) -> list[Metric]:
        points = []
        for attributes, counters, _ in self._batching():
            sizes = dict(_retrying(lambda: counters.batch_sizes.items()))
            if not sizes:
                continue
            counts = [0] * (len(BATCH_ROW_BOUNDS) + 1)
            for rows, batches in sizes.items():
                counts[bisect_left(BATCH_ROW_BOUNDS, rows)] += batches
            points.append(explicit_point(attributes, tuple(counts), float(sum(r * n for r, n in sizes.items())),
                                         float(min(sizes)), float(max(sizes)), BATCH_ROW_BOUNDS, self._start_ns, now))
        if not points:
            return []
        return [Metric(name="tensorgate.batch.size", unit="{row}",
                       description="Rows per batch the gateway sent upstream (requests merged by its batching).",
                       data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE))]

    def _drift_observation_metric(self, now: int) -> list[Metric]:
        """Each monitored feature's bin counts since its reference was set, as a histogram whose
        bounds are the drift bin edges: replicas sharing a reference profile add up bucket by bucket."""
        points = []
        for model, monitor in self._monitors():
            for (kind, name), tensor in list(monitor.tensors.items()):
                since = tensor.observed_since_ns
                for feature, (bounds, counts) in enumerate(tensor.observed_buckets()):
                    total = sum(counts)
                    if not total:
                        continue
                    label = monitor.feature_label(tensor, feature)
                    attributes = {"model": model, "tensor": f"{kind}/{name}", "feature": str(label)}
                    points.append(HistogramDataPoint(
                        attributes=attributes, start_time_unix_nano=since, time_unix_nano=now, count=total,
                        sum=0.0, bucket_counts=counts, explicit_bounds=bounds, min=0.0, max=0.0))
        if not points:
            return []
        return [Metric(name="tensorgate.drift.observations", unit="1",
                       description="Values counted in each drift bin since the reference was set (sum, min and "
                                   "max are not tracked and read 0).",
                       data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE))]

    def produce(self, exponential: bool = False) -> list[Metric]:
        """Every histogram, cumulative since start, from the local aggregates and stage state."""
        now = time.time_ns()
        aggregates = self.aggregates
        return [
            *self._duration_metric("tensorgate.request.duration",
                                   "Time from a request's arrival in the gateway to its response or error.",
                                   aggregates.snapshot(), exponential, now),
            *self._duration_metric("tensorgate.backend.duration",
                                   "Time of the backend call that served a request (its batch's call when batched).",
                                   aggregates.backend_time.snapshot(), exponential, now),
            *self._duration_metric("tensorgate.batching.queue.duration",
                                   "Time a request waited in the gateway's batch queue.",
                                   aggregates.queue_time.snapshot(), exponential, now),
            *self._batch_size_metric(now),
            *self._drift_observation_metric(now),
        ]

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Build the readers and the meter provider; serve the Prometheus endpoint (non-blocking)."""
        if not self.export_metrics:
            return
        config = self.config
        if config.prometheus_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()  # one per gateway: several gateways may share a process
            reader = _prometheus_reader_class()(registry=registry)
            self._readers.append(reader.produce_with(self.produce, self._resource, exponential=False))
            server, _thread = start_http_server(config.prometheus_port, addr=config.prometheus_host, registry=registry)
            self._http_server = server
            self.prometheus_port = server.server_port
            log.info("telemetry: Prometheus metrics on http://%s:%d/metrics", config.prometheus_host, self.prometheus_port)
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure,
                                          headers=dict(config.otlp_headers) or None)
            reader = _PeriodicReader(exporter, export_interval_millis=config.otlp_interval_s * 1e3)
            self._readers.append(reader.produce_with(self.produce, self._resource, config.otlp_histogram == "exponential"))
            log.info("telemetry: OTLP metrics to %s every %.1f s", config.otlp_endpoint, config.otlp_interval_s)
        # Our own provider, not the global one: the gateway is a library too, and tests run several.
        self._provider = MeterProvider(metric_readers=self._readers, resource=self._resource)
        meter = self._provider.get_meter("tensorgate")
        # Every instrument is observable (read at collection): (kind, name, callback, unit, description).
        instruments = (
            ("counter", "tensorgate.requests", self._requests, "{request}",
             "Inference requests finished, by model, version, backend and status."),
            ("counter", "tensorgate.errors", self._errors, "{request}", "Inference requests that failed, by gRPC status."),
            ("gauge", "tensorgate.backend.healthy", self._backend_healthy, "1", "1 while the backend is in rotation, else 0."),
            ("gauge", "tensorgate.backend.inflight", self._backend_inflight, "{request}",
             "Requests sent to the backend, not yet answered."),
            ("counter", "tensorgate.routing.decisions", self._routing_decisions, "{decision}",
             "Backends picked, by pool and why (preferred, spill, failover, canary, shadow, probe)."),
            ("counter", "tensorgate.shadow.copies", self._shadow_copies, "{copy}",
             "Copies of live requests for shadow targets, by outcome (sent, dropped, failed, unplaced)."),
            ("gauge", "tensorgate.placement.service_time", self._service_times, "s",
             "EWMA service time per request in line, per model version and backend (the router's predictor)."),
            ("counter", "tensorgate.retries", self._retries, "{attempt}", "Requests sent again to another backend, by kind"),
            ("counter", "tensorgate.backend.ejections", self._ejections, "{ejection}",
             "Backends taken out of rotation by outlier detection, by reason"),
            ("counter", "tensorgate.shed", self._shed, "{request}", "Requests refused by admission limits (RESOURCE_EXHAUSTED)"),
            ("gauge", "tensorgate.batching.queue.depth", self._queue_depth, "{request}",
             "Requests waiting in the gateway's batch queues."),
            ("gauge", "tensorgate.drift.statistic", self._drift_statistics, "1",
             "Drift statistic of the last evaluated window, per feature."),
            ("counter", "tensorgate.drift.alerts", self._drift_alert_counts, "{alert}", "Drift alert state changes, by level."),
        )
        for kind, name, callback, unit, description in instruments:
            create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            create(name, [callback], unit=unit, description=description)

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._provider is not None:
            # Final OTLP export, bounded: an unreachable collector must not hold up shutdown for long.
            self._provider.shutdown(timeout_millis=2_000)
            self._provider = None
        if self.tracing is not None:
            self.tracing.close()
            self.tracing = None
