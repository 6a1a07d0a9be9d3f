"""Small real servers the tests put around the gateway, to see and steer what it talks to.

    UpstreamProxy    a gRPC proxy between the gateway and a real Triton
    HangingServer    a TCP server that accepts connections and never answers (a collector or
                     webhook receiver that hangs)
    HttpRecorder     an HTTP server that records every POST (a webhook receiver)
    SteadyLoad       clients sending good requests one after another, counting the answers by status

and `scrape(port)`, every sample of a Prometheus /metrics endpoint (the gateway's own).

UpstreamProxy forwards every call unchanged — bytes in, bytes out, the caller's metadata passed on — so the
backend the gateway talks to is still the real Triton behind it. On the way it

- records each call's method and metadata (`calls`), e.g. the `traceparent` of every ModelInfer;
- counts the inference messages it forwards: unary ModelInfer calls and ModelStreamInfer messages;
- can hold those messages (`hold()` … `release()`), so work stays in flight at the backend for as
  long as a test needs, while everything else (health checks, metadata) keeps flowing; `held` says
  how many wait now;
- can go away and come back on the same port (`stop()`, `start()`), like a backend process that dies
  and returns: its connections close, and calls in progress fail.

It is a small real server (grpcio, threads), not a mock: the gateway talks gRPC to it over TCP.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.server
import json
import queue
import socket
import threading
import urllib.request

import grpc

from gateway.bench.loadgen import MODEL_INFER_METHOD, build_infer_request
from tests.waiting import wait_until

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
# Metadata gRPC sets itself, which a caller may not pass on.
_NOT_FORWARDED = ("user-agent",)


def _forwardable(metadata) -> tuple[tuple[str, str], ...]:
    return tuple((key, value) for key, value in metadata
                 if not key.startswith((":", "grpc-")) and key not in _NOT_FORWARDED)


class UpstreamProxy:
    """A proxy on 127.0.0.1:`port` (0: a free one) in front of the Triton at `target`."""

    def __init__(self, target: str, port: int = 0) -> None:
        self.target = target
        self.port = port
        self.calls: list[tuple[str, dict[str, str]]] = []  # (method, metadata) of every call, in order
        self.forwarded = 0  # inference messages passed on to Triton
        self.held = 0  # inference messages received and waiting at the gate now
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._alive = False
        self._server: grpc.Server | None = None
        self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        self.start()

    def __repr__(self) -> str:
        state = "serving" if self._alive else "stopped"
        return f"<UpstreamProxy {self.address} -> {self.target} {state} forwarded={self.forwarded} held={self.held}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control -------------------------------------------------------------------------------

    def start(self) -> "UpstreamProxy":
        """Serve (again) on the proxy's port."""
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(64), options=[*_OPTIONS, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_Handler(self),))
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"could not bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self._server = server
        self._alive = True
        return self

    def stop(self) -> None:
        """Go away: close every connection; calls in progress fail; held messages are never sent."""
        self._alive = False
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None
        self._gate.set()  # what waited at the gate sees the proxy gone and gives up

    def hold(self) -> None:
        """From now on, inference messages wait at the gate instead of going to Triton."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self.stop()
        self._channel.close()

    def metadata_of(self, method: str) -> list[dict[str, str]]:
        """The metadata of every call of `method` (a full path or its last part), in order."""
        with self._lock:
            return [metadata for called, metadata in self.calls if called == method or called.endswith("/" + method)]

    # ---- forwarding ----------------------------------------------------------------------------

    def _record(self, method: str, metadata) -> None:
        with self._lock:
            self.calls.append((method, dict(metadata)))

    def _arrived(self) -> None:
        with self._lock:
            self.held += 1

    def _pass_gate(self) -> bool:
        """Wait while held; False if the proxy went away meanwhile (the message is dropped)."""
        self._gate.wait()
        with self._lock:
            self.held -= 1
            if self._alive:
                self.forwarded += 1
        return self._alive

    def unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = context.invocation_metadata()
        self._record(method, metadata)
        if method == INFER_METHOD:
            self._arrived()
            if not self._pass_gate():
                context.abort(grpc.StatusCode.UNAVAILABLE, "proxy went away")
        remaining = context.time_remaining()  # ~9.2e18 when the caller set no deadline
        try:
            return self._channel.unary_unary(method)(request, metadata=_forwardable(metadata),
                                                     timeout=remaining if remaining < 1e6 else None)
        except grpc.RpcError as error:
            context.abort(error.code(), error.details())

    def stream(self, requests, context: grpc.ServicerContext):
        metadata = context.invocation_metadata()
        self._record(STREAM_METHOD, metadata)
        # Read every message as it arrives (so `held` counts them all), forward them in order.
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        end = object()

        def read() -> None:
            try:
                for message in requests:
                    self._arrived()
                    arrived.put(message)
            except grpc.RpcError:
                pass
            finally:
                arrived.put(end)

        def forward():
            while (message := arrived.get()) is not end:
                if not self._pass_gate():
                    return
                yield message

        threading.Thread(target=read, name="proxy-stream-reader", daemon=True).start()
        responses = self._channel.stream_stream(STREAM_METHOD)(forward(), metadata=_forwardable(metadata))
        context.add_callback(responses.cancel)
        try:
            yield from responses
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                context.abort(error.code(), error.details())


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: UpstreamProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method == STREAM_METHOD:
            return grpc.stream_stream_rpc_method_handler(self._proxy.stream)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._proxy.unary(method, request, context))


class HangingServer:
    """Accepts TCP connections on 127.0.0.1:`port` and never reads or answers; `accepted` counts them."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, name="hanging-server", daemon=True).start()

    @property
    def accepted(self) -> int:
        return len(self._connections)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()


class HttpRecorder:
    """An HTTP server on 127.0.0.1 that answers 200 to every POST and keeps (path, headers, JSON body)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], object]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.posts.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="http-recorder", daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the /metrics endpoint on 127.0.0.1:`port`: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    """The one sample of `name` whose labels include `labels`, or None."""
    found = [value for (sample_name, sample_labels), value in samples.items()
             if sample_name == name and set(labels.items()) <= sample_labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


class SteadyLoad:
    """`workers` clients sending simple_scale one request after another, in a thread, until stopped;
    `outcome` counts the answers by status."""

    def __init__(self, address: str, workers: int = 8) -> None:
        self.address = address
        self.workers = workers
        self.outcome: collections.Counter = collections.Counter()
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        payload = build_infer_request("simple_scale")
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = channel.unary_unary(MODEL_INFER_METHOD)

            async def worker() -> None:
                while not self._stop.is_set():
                    try:
                        await call(payload, timeout=30)
                        self.outcome["OK"] += 1
                    except grpc.aio.AioRpcError as error:
                        self.outcome[error.code().name] += 1
                        if len(self.samples) < 5:
                            self.samples.append(f"{error.code().name}: {error.details()}")

            await asyncio.gather(*(worker() for _ in range(self.workers)))

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def served_more_than(self, count: int, timeout: float = 60) -> None:
        """Until over `count` requests were answered OK; else an AssertionError with the outcomes and
        the first errors (the load stalled)."""
        wait_until(lambda: (dict(self.outcome), list(self.samples)), f"the load to get over {count} answers",
                   timeout, accept=lambda seen: seen[0].get("OK", 0) > count)


class TlsRelay:
    """A TLS server on 127.0.0.1 (a free port) that relays each connection's bytes to a plaintext
    `target` ("host:port") and back: TLS termination in front of an endpoint that cannot serve TLS
    itself (Triton's HTTP endpoint has no TLS). Python's ssl on an asyncio loop in a thread; counts
    the TLS connections it accepted (`connections`) and the handshakes that failed (`refused`)."""

    def __init__(self, target: str, cert_file, key_file, client_ca_file=None) -> None:
        import asyncio
        import ssl

        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_file), str(key_file))
        if client_ca_file is not None:
            context.load_verify_locations(str(client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        self.connections = 0
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-relay", daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=context), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _on_error(self, loop, context) -> None:
        self.refused += 1  # a failed handshake lands here; nothing else in the relay can fail unhandled

    async def _relay(self, reader, writer) -> None:
        import asyncio

        self.connections += 1
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(source, sink) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer))

    def close(self) -> None:
        import asyncio

        async def shut() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
