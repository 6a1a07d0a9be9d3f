"""Real OTLP receivers for tests and benchmarks: what a collector's endpoints receive, kept.

    python -m gateway.bench.otlp_receiver [--port N]   # an OTLP/gRPC sink, e.g. for bench_gateway.py

- `GrpcReceiver`: OTLP/gRPC, the collector's own service definitions (opentelemetry-proto's
  MetricsService and TraceService), served by grpcio in threads of its own — the gateway's
  exporters send here.
- `HttpTraceReceiver`: OTLP/HTTP `POST /v1/traces` — Triton's OpenTelemetry exporter sends here.
  Triton 2.51's exporter posts OTLP/JSON with trace and span ids as hex strings (the OTLP/HTTP
  spec's JSON encoding), which protobuf's JSON parser would read as base64: they are converted.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import http.server
import json
import threading

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Span:
    """One received span, flattened: ids as hex, attributes as a dict."""

    def __init__(self, span, resource: dict) -> None:
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex()
        self.name = span.name
        self.kind = span.kind
        self.start_ns = span.start_time_unix_nano
        self.end_ns = span.end_time_unix_nano
        self.status_code = span.status.code
        self.attributes = attributes_of(span)
        self.resource = resource

    def __repr__(self) -> str:
        return f"<Span {self.name} trace={self.trace_id} id={self.span_id} parent={self.parent_span_id or '-'}>"


def attributes_of(item) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in item.attributes}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            out.extend(Span(span, resource) for span in scope_spans.spans)
    return out


class GrpcReceiver(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC endpoint on 127.0.0.1:`port` that stores every export with its metadata."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.exports: list[tuple[metrics_service_pb2.ExportMetricsServiceRequest, dict[str, str]]] = []
        self.trace_exports: list[tuple[trace_service_pb2.ExportTraceServiceRequest, dict[str, str]]] = []
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, f"could not bind 127.0.0.1:{port}"
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the services' method name, shared by both)
        metadata = dict(context.invocation_metadata())
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.trace_exports.append((request, metadata))
                return trace_service_pb2.ExportTraceServiceResponse()
            self.exports.append((request, metadata))
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def received(self) -> list[tuple[metrics_service_pb2.ExportMetricsServiceRequest, dict[str, str]]]:
        with self.lock:
            return list(self.exports)

    def spans(self) -> list[Span]:
        with self.lock:
            exports = list(self.trace_exports)
        return [span for request, _ in exports for span in spans_of(request)]

    def stop(self) -> None:
        self.server.stop(0).wait(5)


_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


def _hex_ids_to_base64(node) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for value in node:
            _hex_ids_to_base64(value)


class HttpTraceReceiver:
    """An OTLP/HTTP trace endpoint on 127.0.0.1 (`url` to give an exporter), protobuf or JSON."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest()
                if "json" in self.headers.get("Content-Type", ""):
                    document = json.loads(body)
                    _hex_ids_to_base64(document)
                    json_format.ParseDict(document, request, ignore_unknown_fields=True)
                else:
                    request.ParseFromString(body)
                with receiver.lock:
                    receiver.requests.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-http", daemon=True)
        self._thread.start()

    def spans(self) -> list[Span]:
        with self.lock:
            requests = list(self.requests)
        return [span for request in requests for span in spans_of(request)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="An OTLP/gRPC receiver (metrics and traces) that counts what it gets.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    receiver = GrpcReceiver(args.port)
    print(f"otlp receiver on 127.0.0.1:{receiver.port}", flush=True)
    try:
        while True:
            time.sleep(60)
            with receiver.lock:
                metrics, traces = len(receiver.exports), len(receiver.trace_exports)
                receiver.exports.clear()  # a long run must not grow without bound
                receiver.trace_exports.clear()
            print(f"received {metrics} metric exports, {traces} trace exports in the last minute", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()


if __name__ == "__main__":
    main()
