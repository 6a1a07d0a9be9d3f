"""The telemetry stage: OpenTelemetry metrics for the gateway, exported to Prometheus and/or OTLP.

The hot path never calls the SDK. `observer` (a Pipeline observer) bumps local counters
(gateway/telemetry/aggregates.py); `drift_hook` counts drift alerts. At collection time:

    tensorgate.requests            counter    {request}  model, version, rpc.response.status_code
    tensorgate.errors              counter    {request}  the same, status != OK only
    tensorgate.request.duration    histogram  s          the same (request latency in the gateway)
    tensorgate.backend.healthy     gauge      1/0        backend, pool
    tensorgate.backend.outstanding gauge      {request}  backend, pool
    tensorgate.batch.size          gauge      {row}      model, version  (mean rows per batch)
    tensorgate.batching.queue_delay gauge     s          model, version  (mean queue delay)
    tensorgate.drift.statistic     gauge      1          model, tensor, feature, statistic (last window)
    tensorgate.drift.alerts        counter    {alert}    model, tensor, statistic, level

Counters and gauges are observable instruments (callbacks yield Observations). The SDK (1.45) has no
MetricProducer and no observable histogram, so the histogram is added to each collection by the
readers below (`_receive_metrics`, the seam every MetricReader implements) as cumulative data.
Duration is per inference request (one of many on a ModelStreamInfer stream), not per gRPC call,
hence a tensorgate.* name rather than the semantic conventions' rpc.server.call.duration.

Exporters run off the event loop: Prometheus in prometheus_client's HTTP server thread, OTLP in
the PeriodicExportingMetricReader's thread; a collector that is down never slows a request.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import grpc
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
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

from gateway.telemetry.aggregates import BOUNDS_S, OK, RequestAggregates
from gateway.telemetry.config import TelemetryConfig

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

    _produce: Callable[[], list[Metric]]
    _resource: Resource

    def _receive_metrics(self, metrics_data: MetricsData | None, timeout_millis: float = 10_000, **kwargs) -> None:
        try:
            extra = self._produce()
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


class TelemetryStage:
    """Metrics of one gateway. `observer` goes in Pipeline.observers, `drift_hook` in DriftStage.hooks."""

    def __init__(self, config: TelemetryConfig, gateway=None) -> None:
        self.config = config
        self.gateway = gateway
        self.aggregates = RequestAggregates()
        self.drift_alerts: dict[tuple[str, str, str, str], int] = {}
        self.observe_errors = 0
        self.prometheus_port: int | None = None
        self._start_ns = time.time_ns()
        self._resource = Resource.create({"service.name": "tensorgate"})
        self._readers: list[MetricReader] = []
        self._http_server = None
        self._provider: MeterProvider | None = None

    def __repr__(self) -> str:
        return f"<TelemetryStage {self.aggregates!r} prometheus_port={self.prometheus_port} otlp={self.config.otlp_endpoint!r}>"

    # -- hot path ---------------------------------------------------------------------------

    def observer(self, entry, request, response, elapsed_ns: int, error) -> None:
        """Pipeline observer: a dict lookup and a few int increments per request."""
        try:
            self.aggregates.record(entry.name, entry.version, OK if error is None else error.code, elapsed_ns)
        except Exception:  # metrics must never fail the request they count
            self.observe_errors += 1
            if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
                log.exception("telemetry observer failed (%d times)", self.observe_errors)

    def drift_hook(self, alert: dict) -> None:
        """DriftStage hook: count alerts by model, tensor, statistic and level."""
        key = (str(alert.get("model")), str(alert.get("tensor")), str(alert.get("statistic")), str(alert.get("level")))
        self.drift_alerts[key] = self.drift_alerts.get(key, 0) + 1

    # -- collection (exporter threads) -----------------------------------------------------

    def _requests(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.count, s.attributes) for s in self.aggregates.snapshot()]

    def _errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.count, s.attributes) for s in self.aggregates.snapshot() if s.code is not OK]

    def _backends(self) -> list:
        fleet = getattr(self.gateway, "fleet", None)
        return _retrying(fleet.backends) if fleet is not None else []

    def _backend_healthy(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if b.healthy else 0, {"backend": b.address, "pool": b.pool}) for b in self._backends()]

    def _backend_outstanding(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(b.outstanding, {"backend": b.address, "pool": b.pool}) for b in self._backends()]

    def _batching(self) -> list[tuple[dict, dict]]:
        batching = getattr(self.gateway, "batching", None)
        if batching is None:
            return []
        out = []
        for key, snapshot in _retrying(lambda: batching.statistics().items()):
            model, _, version = key.rpartition(":")
            out.append(({"model": model, "version": version}, snapshot))
        return out

    def _batch_size(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s["mean_batch_rows"], attrs) for attrs, s in self._batching()]

    def _queue_delay(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s["mean_queue_delay_us"] / 1e6, attrs) for attrs, s in self._batching()]

    def _drift_statistics(self, options: CallbackOptions) -> Iterable[Observation]:
        drift = getattr(self.gateway, "drift", None)
        out = []
        for model, monitor in list(getattr(drift, "monitors", {}).items()):
            report = monitor.last_report
            for feature in (report or {}).get("features", ()):
                for statistic, value in feature["statistics"].items():
                    out.append(Observation(value, {"model": model, "tensor": feature["tensor"],
                                                   "feature": str(feature["feature"]), "statistic": statistic}))
        return out

    def _drift_alert_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"model": m, "tensor": t, "statistic": s, "level": level})
            for (m, t, s, level), count in list(self.drift_alerts.items())
        ]

    def produce(self) -> list[Metric]:
        """The request-duration histogram, cumulative since start, from the local aggregates."""
        now = time.time_ns()
        points = [
            HistogramDataPoint(
                attributes=s.attributes, start_time_unix_nano=self._start_ns, time_unix_nano=now,
                count=s.count, sum=s.sum_s, bucket_counts=s.bucket_counts, explicit_bounds=BOUNDS_S,
                min=s.min_s, max=s.max_s,
            )
            for s in self.aggregates.snapshot() if s.count
        ]
        if not points:
            return []
        return [Metric(
            name="tensorgate.request.duration",
            description="Time from a request's arrival in the gateway's pipeline to its response or error.",
            unit="s",
            data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )]

    # -- lifecycle --------------------------------------------------------------------------

    def _reader_setup(self, reader: _Producing) -> _Producing:
        reader._produce = self.produce
        reader._resource = self._resource
        return reader

    def start(self) -> None:
        """Build the readers and the meter provider; serve the Prometheus endpoint (non-blocking)."""
        config = self.config
        if config.prometheus_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()  # one per gateway: several gateways may share a process
            reader = _prometheus_reader_class()(registry=registry)
            self._readers.append(self._reader_setup(reader))
            server, _thread = start_http_server(config.prometheus_port, addr=config.prometheus_host, registry=registry)
            self._http_server = server
            self.prometheus_port = server.server_port
            log.info("telemetry: Prometheus metrics on http://%s:%d/metrics", config.prometheus_host, self.prometheus_port)
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure,
                                          headers=dict(config.otlp_headers) or None)
            reader = _PeriodicReader(exporter, export_interval_millis=config.otlp_interval_s * 1e3)
            self._readers.append(self._reader_setup(reader))
            log.info("telemetry: OTLP metrics to %s every %.1f s", config.otlp_endpoint, config.otlp_interval_s)
        # Our own provider, not the global one: the gateway is a library too, and tests run several.
        self._provider = MeterProvider(metric_readers=self._readers, resource=self._resource)
        meter = self._provider.get_meter("tensorgate")
        meter.create_observable_counter("tensorgate.requests", [self._requests], unit="{request}",
                                        description="Inference requests finished, by model, version and status.")
        meter.create_observable_counter("tensorgate.errors", [self._errors], unit="{request}",
                                        description="Inference requests that failed, by gRPC status.")
        meter.create_observable_gauge("tensorgate.backend.healthy", [self._backend_healthy], unit="1",
                                      description="1 while the backend is in rotation, else 0.")
        meter.create_observable_gauge("tensorgate.backend.outstanding", [self._backend_outstanding],
                                      unit="{request}", description="Requests sent to the backend, not yet answered.")
        meter.create_observable_gauge("tensorgate.batch.size", [self._batch_size], unit="{row}",
                                      description="Mean rows per batch sent upstream by the gateway's batching.")
        meter.create_observable_gauge("tensorgate.batching.queue_delay", [self._queue_delay], unit="s",
                                      description="Mean time a request waited in the gateway's batch queue.")
        meter.create_observable_gauge("tensorgate.drift.statistic", [self._drift_statistics], unit="1",
                                      description="Drift statistic of the last evaluated window, per feature.")
        meter.create_observable_counter("tensorgate.drift.alerts", [self._drift_alert_counts], unit="{alert}",
                                        description="Drift alert state changes, by level.")

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._provider is not None:
            # Final OTLP export, bounded: an unreachable collector must not hold up shutdown for long.
            self._provider.shutdown(timeout_millis=2_000)
            self._provider = None
