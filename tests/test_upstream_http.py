"""Unit tests of the HTTP upstream (gateway/upstream/http.py, rest.py) against an in-process HTTP server.

The server here answers like Triton's HTTP endpoint or misbehaves on purpose (closes idle
connections, dies mid-answer, never answers, answers chunked or too large), so the pool's rules
are checked one by one: keep-alive reuse, the bound on connections, cancellation closes the
connection, a stale keep-alive connection is retried once, unreachable backends and broken
connections are reported. tests/test_upstream_http_triton.py checks the same transport against
real Tritons. Every test runs on uvloop and on the stock asyncio loop.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httptools
import pytest

from gateway.errors import BackendError, InvalidArgument, Unavailable
from gateway.protocol import pb
from gateway.upstream.http import HttpPool
from gateway.upstream.rest import RestInference, decode_response, encode_request, error_of


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request):
    """Run a coroutine on a fresh loop of each kind."""
    def runner(coroutine):
        if request.param == "uvloop":
            import uvloop

            return uvloop.run(coroutine)
        return asyncio.run(coroutine)

    return runner


class StandIn(asyncio.Protocol):
    """One connection of the stand-in server; `server.behaviour` says how to answer."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.append(self)

    def connection_lost(self, exc) -> None:
        self.server.closed += 1

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (self.url, dict(self.headers), b"".join(self.body))
        self.url, self.headers, self.body = b"", {}, []
        self.server.requests.append(request)
        self.server.behaviour(self, *request)


def infer_answer(protocol: StandIn, url: bytes, headers: dict, body: bytes) -> None:
    """Like Triton: OUTPUT0 = the first input's bytes, id and parameters echoed."""
    header_length = int(headers[b"inference-header-content-length"])
    request = json.loads(body[:header_length])
    first = request["inputs"][0]
    blob = body[header_length:header_length + first["parameters"]["binary_data_size"]]
    answer = {"model_name": url.split(b"/")[3].decode(), "model_version": "1",
              "outputs": [{"name": "OUTPUT0", "datatype": first["datatype"], "shape": first["shape"],
                           "parameters": {"binary_data_size": len(blob)}}],
              "parameters": {"echo": request.get("parameters", {}).get("echo", "none")}}
    if "id" in request:
        answer["id"] = request["id"]
    header = json.dumps(answer).encode()
    protocol.transport.write(
        b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(header), len(header) + len(blob)) + header + blob)


class Server:
    def __init__(self, behaviour=infer_answer) -> None:
        self.behaviour = behaviour
        self.connections: list[StandIn] = []
        self.requests: list[tuple] = []
        self.closed = 0
        self.server = None
        self.port = 0

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.get_running_loop().create_server(lambda: StandIn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for connection in self.connections:
            connection.transport.abort()

    def pool(self, broken: list | None = None, **options) -> HttpPool:
        settings = {"max_connections": 4, "connect_timeout_s": 1.0, "max_body_bytes": 1 << 20, **options}
        return HttpPool("127.0.0.1", self.port, on_broken=(broken.append if broken is not None else lambda r: None),
                        **settings)


def infer_request(value: bytes = b"\x01\x02\x03\x04", request_id: str = "") -> "pb.ModelInferRequest":
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(value)
    return request


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------ the pool


def test_sequential_requests_share_one_keep_alive_connection(run):
    async def scenario():
        async with Server() as server:
            rest = RestInference(server.pool(), "b")
            for index in range(5):
                response = await rest.infer(infer_request(bytes([index]) * 4, request_id=f"r{index}"))
                assert response.id == f"r{index}" and response.raw_output_contents[0] == bytes([index]) * 4
            assert len(server.connections) == 1
            assert "1 idle" in repr(rest.pool) and "requests=5 connects=1" in repr(rest.pool)

    run(scenario())


def test_connections_are_bounded_and_waiters_served_in_turn(run):
    async def scenario():
        async with Server() as server:
            pool = server.pool(max_connections=2)
            rest = RestInference(pool, "b")
            answers = await asyncio.gather(*(rest.infer(infer_request(bytes([i]) * 4)) for i in range(12)))
            assert [a.raw_output_contents[0][0] for a in answers] == list(range(12))
            assert len(server.connections) == 2
            assert pool.snapshot()["idle"] == 2 and pool.snapshot()["waiting"] == 0

    run(scenario())


def test_cancelled_caller_closes_its_connection(run):
    async def scenario():
        server = Server(lambda *args: None)
        async with server:
            pool = server.pool()
            rest = RestInference(pool, "b")
            call = asyncio.ensure_future(rest.infer(infer_request()))
            await settle()
            assert pool.snapshot()["active"] == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await settle()
            assert server.closed == 1 and pool.connections == 0
            server.behaviour = infer_answer  # the next request gets a new, clean connection
            response = await rest.infer(infer_request(b"abcd"))
            assert response.raw_output_contents[0] == b"abcd" and len(server.connections) == 2

    run(scenario())


def test_cancelled_waiter_takes_no_connection(run):
    async def scenario():
        server = Server(lambda *args: None)
        async with server:
            pool = server.pool(max_connections=1)
            rest = RestInference(pool, "b")
            first = asyncio.ensure_future(rest.infer(infer_request()))
            second = asyncio.ensure_future(rest.infer(infer_request()))
            await settle()
            assert pool.snapshot()["waiting"] == 1
            second.cancel()
            await settle()
            server.behaviour = infer_answer
            first.cancel()
            await settle()
            assert (await rest.infer(infer_request(b"wxyz"))).raw_output_contents[0] == b"wxyz"
            assert pool.connections == 1

    run(scenario())


def test_idle_connection_closed_by_the_server_is_retried_on_a_new_one(run):
    async def scenario():
        async with Server() as server:
            broken: list = []
            pool = server.pool(broken)
            rest = RestInference(pool, "b")
            await rest.infer(infer_request())
            # The server closes the kept-alive connection, but the client has not seen it yet.
            server.connections[0].transport.close()
            response = await rest.infer(infer_request(b"next"))
            assert response.raw_output_contents[0] == b"next"
            assert not broken and len(server.connections) == 2

    run(scenario())


def test_unreachable_backend_is_unavailable_and_reported(run):
    async def scenario():
        async with Server() as server:
            port = server.port
        broken: list = []
        pool = HttpPool("127.0.0.1", port, max_connections=2, connect_timeout_s=1.0, max_body_bytes=1024,
                        on_broken=broken.append)
        with pytest.raises(Unavailable, match="unavailable .connection failed or lost.; retry") as error:
            await RestInference(pool, "b").infer(infer_request())
        assert "unreachable" in error.value.detail and "unreachable" not in error.value.message
        assert len(broken) == 1 and pool.connections == 0

    run(scenario())


def test_backend_dying_mid_answer_is_unavailable_and_reported(run):
    def half(protocol, url, headers, body):
        protocol.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"model")
        protocol.transport.abort()

    async def scenario():
        async with Server(half) as server:
            broken: list = []
            with pytest.raises(Unavailable, match="unavailable .connection failed or lost.; retry") as error:
                await RestInference(server.pool(broken), "b").infer(infer_request())
            assert "connection closed" in error.value.detail  # for the log, not the client
            assert len(broken) == 1

    run(scenario())


def test_chunked_answer_and_closing_answer(run):
    def chunked(protocol, url, headers, body):
        header = json.dumps({"model_name": "m", "outputs": [
            {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 1], "parameters": {"binary_data_size": 4}}]}).encode()
        payload = header + b"\x07\x00\x00\x00"
        protocol.transport.write(
            b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(header), 5, payload[:5], len(payload) - 5, payload[5:]))

    async def scenario():
        async with Server(chunked) as server:
            pool = server.pool()
            response = await RestInference(pool, "b").infer(infer_request())
            assert response.raw_output_contents[0] == b"\x07\x00\x00\x00"
            await settle()
            assert pool.connections == 0  # the server asked to close: not kept

    run(scenario())


def test_answer_over_the_size_limit_is_resource_exhausted(run):
    def big(protocol, url, headers, body):
        protocol.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)

    async def scenario():
        async with Server(big) as server:
            broken: list = []
            with pytest.raises(BackendError) as caught:
                await RestInference(server.pool(broken, max_body_bytes=1024), "b").infer(infer_request())
            assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in caught.value.message
            assert not broken

    run(scenario())


def test_closed_pool_refuses(run):
    async def scenario():
        async with Server() as server:
            pool = server.pool()
            await RestInference(pool, "b").infer(infer_request())
            pool.close()
            with pytest.raises(Unavailable, match="shutting down"):
                await RestInference(pool, "b").infer(infer_request())

    run(scenario())


# ------------------------------------------------------------------------- request and answer


def test_request_header_carries_ids_parameters_outputs_and_trace_headers(run):
    async def scenario():
        async with Server() as server:
            request = infer_request(request_id="client-7")
            request.parameters["timeout"].int64_param = 1500
            request.parameters["echo"].string_param = "yes"
            request.parameters["flag"].bool_param = True
            request.parameters["ratio"].double_param = 0.5
            request.parameters["big"].uint64_param = 1 << 63
            request.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 2
            response = await RestInference(server.pool(), "b").infer(
                request, {"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"})
            url, headers, body = server.requests[0]
            header = json.loads(body[:int(headers[b"inference-header-content-length"])])
            assert url == b"/v2/models/m/infer"
            assert headers[b"traceparent"].startswith(b"00-0123456789abcdef")
            assert header["id"] == "client-7"
            assert header["parameters"] == {"timeout": 1500, "echo": "yes", "flag": True, "ratio": 0.5, "big": 1 << 63}
            assert header["outputs"] == [{"name": "OUTPUT0", "parameters": {"classification": 2, "binary_data": True}}]
            assert header["inputs"][0]["parameters"] == {"binary_data_size": 4}
            assert response.id == "client-7" and response.parameters["echo"].string_param == "yes"

    run(scenario())


def test_typed_contents_become_raw_bytes():
    request = pb.ModelInferRequest(model_name="m", model_version="2")
    tensor = request.inputs.add(name="A", datatype="INT16", shape=[3])
    tensor.contents.int_contents.extend([1, -2, 3])
    text = request.inputs.add(name="T", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"ab", b""])
    header, blobs = encode_request(request)
    assert blobs == [b"\x01\x00\xfe\xff\x03\x00", b"\x02\x00\x00\x00ab\x00\x00\x00\x00"]
    inputs = json.loads(header)["inputs"]
    assert [i["parameters"]["binary_data_size"] for i in inputs] == [6, 10]
    assert json.loads(header)["parameters"] == {"binary_data_output": True}


def test_typed_value_out_of_range_is_invalid_argument():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="A", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(InvalidArgument, match="input 'A'"):
        encode_request(request)


def test_answer_decoding_keeps_parameters_and_bytes():
    header = json.dumps({"id": "x", "model_name": "m", "model_version": "3", "parameters": {"p": 1, "q": 1.5},
                         "outputs": [{"name": "O", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": 7, "note": "n"}}]}).encode()
    response = decode_response(header + b"\x03\x00\x00\x00abc", len(header), "b")
    assert (response.id, response.model_name, response.model_version) == ("x", "m", "3")
    assert response.raw_output_contents[0] == b"\x03\x00\x00\x00abc"
    assert response.outputs[0].parameters["note"].string_param == "n" and "binary_data_size" not in response.outputs[0].parameters
    assert response.parameters["p"].int64_param == 1 and response.parameters["q"].double_param == 1.5
    with pytest.raises(BackendError, match="ends past"):
        decode_response(header + b"\x03", len(header), "b")


def _request_of(request_id="", blob=b"\x00" * 64, datatype="FP32", shape=(1, 16), **parameters):
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(blob)
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


@pytest.mark.parametrize("request_id", ["", "b7", 'say "hi"', "é-ünï", "a\\b"])
def test_request_headers_built_from_the_layout_cache_are_whole(request_id):
    """The inputs part comes from a cache after the first request of a layout: every request's
    header is still its own (id, parameters, sizes), the first and the cached one alike."""
    expected_inputs = [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}]
    for timeout in (None, 1500, 1500):  # a miss, then hits
        request = _request_of(request_id, **({} if timeout is None else {"timeout": timeout}))
        header = json.loads(encode_request(request)[0])
        assert header["inputs"] == expected_inputs
        assert header.get("id", "") == request_id
        assert header["parameters"] == {"binary_data_output": True, **({} if timeout is None else {"timeout": timeout})}
    # BYTES of another length, or another shape: another layout, never a cached header of the wrong size
    for size in (9, 12, 9):
        header = json.loads(encode_request(_request_of(blob=b"\x05\x00\x00\x00" + b"x" * (size - 4), datatype="BYTES",
                                                       shape=(1,)))[0])
        assert header["inputs"][0]["parameters"] == {"binary_data_size": size}
    header = json.loads(encode_request(_request_of(shape=(2, 8)))[0])
    assert header["inputs"][0]["shape"] == [2, 8]


@pytest.mark.parametrize("set_parameters, expected", [
    (lambda p: p["timeout"].__setattr__("int64_param", 1500), {"timeout": 1500}),  # the deadline alone: fast path
    (lambda p: p["timeout"].__setattr__("int64_param", 0), {"timeout": 0}),
    (lambda p: p["timeout"].__setattr__("int64_param", -5), {}),  # negative: as gRPC reads it, no timeout
    (lambda p: p["timeout"].__setattr__("uint64_param", 7), {"timeout": 7}),
    (lambda p: p["timeout"].__setattr__("string_param", "9"), {"timeout": "9"}),  # passed on; Triton's to refuse
    (lambda p: (p["timeout"].__setattr__("int64_param", 3), p["note"].__setattr__("string_param", "x")),
     {"timeout": 3, "note": "x"}),
])
def test_request_parameters_reach_the_header_as_sent(set_parameters, expected):
    request = _request_of()
    set_parameters(request.parameters)
    header = json.loads(encode_request(request)[0])
    assert header["parameters"] == {**expected, "binary_data_output": True}


def _triton_header(**fields) -> bytes:
    """An answer header as Triton writes it: compact, the id first."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("answer_id", ["", "b7", 'say "hi"', "é-ünï", "a\\b"])
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_answers_decoded_from_the_header_cache_keep_their_own_id_and_bytes(answer_id, kind):
    outputs = [{"name": "O", "datatype": "INT32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
               {"name": "P", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5, "note": "n"}}]
    for round_ in range(3):  # the first answer parses the header, the next ones are made from its template
        fields = {"id": answer_id} if answer_id else {}
        header = _triton_header(**fields, model_name="m", model_version="1", outputs=outputs, parameters={"p": round_ + 1})
        data = round_.to_bytes(8, "little") + b"\x01\x00\x00\x00" + bytes([round_])
        response = decode_response(kind(header + data), len(header), "b")
        assert (response.id, response.model_name, response.model_version) == (answer_id, "m", "1")
        assert list(response.raw_output_contents) == [data[:8], data[8:]]
        assert [o.name for o in response.outputs] == ["O", "P"] and list(response.outputs[0].shape) == [1, 2]
        assert response.outputs[1].parameters["note"].string_param == "n"
        assert response.parameters["p"].int64_param == round_ + 1
        with pytest.raises(BackendError, match="output 'P' ends past"):  # checked on a cached header too
            decode_response(kind(header + data[:-1]), len(header), "b")


def test_the_codec_caches_are_bounded():
    from gateway.upstream.rest import _Templates

    cache = _Templates(limit=3)
    for key in range(10):
        assert cache.keep(key, str(key)) == str(key)
        assert len(cache) <= 3 and cache[key] == str(key)


@pytest.mark.parametrize("status, code", [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (404, grpc.StatusCode.NOT_FOUND), (500, grpc.StatusCode.INTERNAL),
    (501, grpc.StatusCode.UNIMPLEMENTED), (503, grpc.StatusCode.UNAVAILABLE), (418, grpc.StatusCode.UNKNOWN)])
def test_http_status_becomes_tritons_grpc_status(status, code):
    error = error_of(status, b'{"error":"what Triton said"}', "b")
    assert error.code is code and "what Triton said" in error.message
    assert isinstance(error, Unavailable) == (status == 503)


# ------------------------------------------------------------------------------------ config


def test_transport_config_and_http_addresses():
    from gateway.config import config_from_mapping
    from gateway.errors import ConfigError

    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {
        "a": {"backends": ["10.0.0.5:8001", "[::1]:9001"]},
        "b": {"backends": ["h:7001"], "http_backends": ["h:7500"]}}})
    assert config.upstream.transport == "http"
    assert config.pools["a"].http_address(0, -1) == "10.0.0.5:8000"
    assert config.pools["a"].http_address(1, -1) == "[::1]:9000"
    assert config.pools["b"].http_address(0, -1) == "h:7500"
    with pytest.raises(ConfigError, match="upstream.transport"):
        config_from_mapping({"listen": "h:0", "pools": {"a": {"backends": ["h:1"]}}, "upstream": {"transport": "h3"}})
    with pytest.raises(ConfigError, match=r"pools.a.http_backends: expected one HTTP address per backend"):
        config_from_mapping({"listen": "h:0", "pools": {"a": {"backends": ["h:1", "h:2"], "http_backends": ["h:3"]}}})
    with pytest.raises(ConfigError, match=r"pools.a.http_backends\[0\]"):
        config_from_mapping({"listen": "h:0", "pools": {"a": {"backends": ["h:1"], "http_backends": ["nope"]}}})
