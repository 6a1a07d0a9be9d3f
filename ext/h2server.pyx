# cython: language_level=3, boundscheck=False, wraparound=False
"""An HTTP/2 server for an ASGI app, on the event loop's own thread: libnghttp2 under an asyncio Protocol.

Why it exists: on the envoy engine a request crosses three threads (Envoy's worker, pyvoy's executor,
the event loop) and wakes them about eight times; at a moderate rate each wake-up serves one request
and the hand-overs cost more than the gateway's Python (benchmarks/RESULTS.md, "Eighth session").
Here nothing crosses a thread: the loop reads the socket, libnghttp2 (C) parses the frames and HPACK,
and the app runs on the same loop. One read carries every request that arrived together; every
answer made in one loop turn leaves in one write.

`Connection` is the asyncio Protocol of one client connection. It speaks ASGI 3 to the app, with the
HTTP trailers extension (`http.response.trailers`), which is what gRPC needs:

- a request's HEADERS start the app in a task of its own; `receive()` hands over the body received
  so far (all of it, joined, in one `http.request` event when it is there) and, once the body is
  complete, waits for `http.disconnect`;
- `send()` only queues: the response's HEADERS go out with its first body (or alone, ending the
  stream, for a trailers-only answer), DATA is taken from the queue by libnghttp2's data provider,
  and trailers end the stream after it. Frames are serialized once per loop turn (`_flush`);
- flow control is manual: a stream's window and the connection's are returned only when the app
  has taken the bytes (or they were dropped: the stream was answered or reset), so what a client
  makes the server hold unread is bounded by the connection window, whatever number of streams;
- a stream the client resets (or whose connection is lost) before its answer is complete has its
  task cancelled, its pending `receive()` answered with `http.disconnect`, and any later `send()`
  raises ConnectionResetError;
- an app that ends without completing its answer has the stream reset (INTERNAL_ERROR).

`drain()` sends GOAWAY (first a notice, then the last stream id it processed); `close()` closes the
transport. The engine (gateway/server/engines/h2.py) owns the listening socket and its connections.
"""

import asyncio
import logging
from urllib.parse import unquote_to_bytes

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy


cdef extern from "nghttp2_api.h":
    ctypedef struct nghttp2_session
    ctypedef struct nghttp2_session_callbacks
    ctypedef struct nghttp2_option
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef union nghttp2_data_source:
        int fd
        void *ptr
    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *) noexcept
    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value
    ctypedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*nghttp2_on_header_callback)(
        nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *, size_t,
        uint8_t, void *) noexcept
    ctypedef int (*nghttp2_on_data_chunk_recv_callback)(
        nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *) noexcept
    ctypedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*nghttp2_on_frame_send_callback)(nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *, int32_t, uint32_t, void *) noexcept

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        NGHTTP2_NO_ERROR
        NGHTTP2_PROTOCOL_ERROR
        NGHTTP2_INTERNAL_ERROR
        NGHTTP2_CANCEL
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_END_STREAM
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        NGHTTP2_ERR_CALLBACK_FAILURE

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *, nghttp2_on_begin_headers_callback)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, nghttp2_on_header_callback)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, nghttp2_on_data_chunk_recv_callback)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, nghttp2_on_frame_recv_callback)
    void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *, nghttp2_on_frame_send_callback)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *, nghttp2_on_stream_close_callback)
    int nghttp2_option_new(nghttp2_option **option_ptr)
    void nghttp2_option_del(nghttp2_option *option)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val)
    int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *)
    void nghttp2_session_del(nghttp2_session *session)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *data, size_t length)
    ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr)
    int nghttp2_session_want_read(nghttp2_session *session)
    int nghttp2_session_want_write(nghttp2_session *session)
    int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t)
    void *nghttp2_session_get_stream_user_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_set_stream_user_data(nghttp2_session *session, int32_t stream_id, void *data)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session)
    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t)
    int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t, const nghttp2_data_provider *)
    int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t)
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t)
    int nghttp2_submit_shutdown_notice(nghttp2_session *session)
    int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *, size_t)
    const char *nghttp2_strerror(int lib_error_code)


cdef extern from "<dlfcn.h>":
    void *dlsym(void *handle, const char *symbol)
    void *RTLD_DEFAULT

ctypedef void (*_option_setter)(nghttp2_option *option, int value)
ctypedef void (*_rate_setter)(nghttp2_option *option, uint64_t burst, uint64_t rate)

# libnghttp2 1.50+ refuses a header value with leading or trailing whitespace (RFC 9113 §8.2.1) by
# resetting the stream: a client that sends `authorization: Bearer ` (grpc clients pass such values
# through) would get a bare PROTOCOL_ERROR where Envoy and grpc.aio hand the value to the gateway,
# which answers UNAUTHENTICATED with a message. Turned off where the library has the option; looked
# up at run time, so that an older library (without the check) still loads.
cdef _option_setter _no_ws_validation = <_option_setter>dlsym(
    RTLD_DEFAULT, b"nghttp2_option_set_no_rfc9113_leading_and_trailing_ws_validation")

# libnghttp2's rapid-reset protection (1.57+, and Debian's 1.52 since its CVE-2023-44487 fix) sends
# GOAWAY once a connection's resets exceed a token bucket: 1,000, refilled at 33 a second. It counts
# every RST_STREAM a client sends, a client's own cancellations and deadlines included, so a busy
# client whose calls time out at more than 33 a second lost its connection. The bucket is kept
# (a flood of 100,000 resets a second is still cut off after the first 1,000), refilled at 1,000 a
# second: one reset a millisecond costs the gateway a task it starts and cancels.
cdef _rate_setter _reset_rate_limit = <_rate_setter>dlsym(RTLD_DEFAULT, b"nghttp2_option_set_stream_reset_rate_limit")
RESET_BURST = 1000
RESET_RATE_PER_S = 1000

log = logging.getLogger("gateway.server.engines.h2")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_EXTENSIONS = {"http.response.trailers": {}}
_DISCONNECT = {"type": "http.disconnect"}
_STATUS_200 = b"200"


class H2Error(Exception):
    """libnghttp2 refused an operation (its error text included)."""


cdef str _error_text(int code):
    return (<bytes>nghttp2_strerror(code)).decode("ascii", "replace")


cdef class Connection


cdef inline void _release(object waiter):
    """Wake what awaits `waiter` (a receive() or a send() held back), if anything does."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


cdef class Stream:
    """One request/response exchange: what the client sent, and the answer the app is making."""

    cdef Connection conn
    cdef readonly int32_t id
    cdef list headers
    cdef bytes method
    cdef bytes raw_path
    cdef list chunks               # body received, not yet handed to the app
    cdef size_t unconsumed         # their bytes: the stream window they still hold
    cdef bint request_ended        # the client's END_STREAM arrived
    cdef bint body_given           # the last http.request event was handed over
    cdef bint closed               # libnghttp2 closed the stream
    cdef readonly bint reset       # ended before its answer was complete (client reset, connection lost)
    cdef object receiver           # the future a waiting receive() awaits
    cdef object drained            # the future a send() waits on while too much is queued
    cdef object task
    cdef bint started              # the app was started (once: later HEADERS are the client's trailers)
    cdef object response_headers   # from http.response.start until submitted
    cdef bytes status
    cdef bint wants_trailers
    cdef bint submitted
    cdef bint body_ended
    cdef object trailers           # the trailer fields, once the app gave them
    cdef readonly bint answered    # the app gave its whole answer (body ended, trailers if announced)
    cdef readonly bint complete    # the frame ending the stream is submitted
    cdef list outbound             # body bytes for the data provider
    cdef Py_ssize_t offset         # how much of outbound[0] was sent
    cdef Py_ssize_t queued         # bytes in outbound
    cdef size_t header_bytes       # the request's header list so far, as RFC 9113 counts it
    cdef bint deferred             # the data provider is waiting for more

    def __cinit__(self, Connection conn, int32_t stream_id):
        self.conn = conn
        self.id = stream_id
        self.headers = []
        self.chunks = []
        self.outbound = []

    def __repr__(self):
        return (f"<h2 Stream {self.id} ended={self.request_ended} complete={self.complete} "
                f"reset={self.reset} queued={self.queued}>")

    # ------------------------------------------------------------------------ ASGI receive

    async def receive(self):
        cdef bytes body
        while True:
            if self.reset:
                return _DISCONNECT
            if self.chunks or (self.request_ended and not self.body_given):
                if len(self.chunks) == 1:
                    body = self.chunks[0]
                else:
                    body = b"".join(self.chunks)
                self.chunks = []
                if self.unconsumed:
                    self.conn.consume(self.id, self.unconsumed)
                    self.unconsumed = 0
                if self.request_ended:
                    self.body_given = True
                return {"type": "http.request", "body": body, "more_body": not self.request_ended}
            if self.closed:
                return _DISCONNECT
            waiter = self.conn.loop.create_future()
            self.receiver = waiter
            try:
                await waiter
            finally:
                self.receiver = None

    cdef void wake(self):
        _release(self.receiver)

    cdef object gone(self):
        return ConnectionResetError(f"HTTP/2 stream {self.id}: the client reset it")

    # --------------------------------------------------------------------------- ASGI send

    async def send(self, dict message):
        kind = message["type"]
        if self.reset:
            raise self.gone()
        if kind == "http.response.body":
            self.body(message.get("body", b""), message.get("more_body", False))
            if self.queued > self.conn.send_buffer_bytes:
                await self.wait_drained()
        elif kind == "http.response.start":
            if self.submitted or self.response_headers is not None:
                raise RuntimeError("http.response.start sent twice")
            self.status = _STATUS_200 if message["status"] == 200 else str(message["status"]).encode()
            self.response_headers = message.get("headers", ())
            self.wants_trailers = message.get("trailers", False)
        elif kind == "http.response.trailers":
            if not self.wants_trailers:
                raise RuntimeError("http.response.trailers without trailers: True in http.response.start")
            if not self.body_ended:
                raise RuntimeError("http.response.trailers before the body ended (more_body: False)")
            if self.trailers is None:
                self.trailers = list(message.get("headers", ()))
            else:
                self.trailers.extend(message.get("headers", ()))
            if not message.get("more_trailers", False):
                self.answered = True
                self.resume()
        else:
            raise ValueError(f"not an ASGI HTTP send event: {kind!r}")

    cdef body(self, object data, bint more):
        if self.response_headers is None and not self.submitted:
            raise RuntimeError("http.response.body before http.response.start")
        if self.body_ended:
            raise RuntimeError("http.response.body after the body ended (more_body: False)")
        if data:
            if type(data) is not bytes:
                data = bytes(data)
            self.outbound.append(data)
            self.queued += PyBytes_GET_SIZE(data)
        if not more:
            self.body_ended = True
            if not self.wants_trailers:
                self.answered = True
        if not self.submitted:
            headers = self.response_headers
            alone = self.body_ended and not self.outbound and not self.wants_trailers
            try:  # headers alone end the stream (a trailers-only gRPC answer)
                self.conn.submit_response(self, headers, not alone)
            except BaseException:
                self.answered = False  # not sent: the app's end resets the stream
                raise
            self.submitted = True
            self.response_headers = None
            self.complete = alone
        else:
            self.resume()

    cdef void resume(self):
        if self.deferred:
            self.deferred = False
            self.conn.resume(self.id)

    async def wait_drained(self):
        while self.queued > self.conn.send_buffer_bytes and not self.reset:
            waiter = self.conn.loop.create_future()
            self.drained = waiter
            try:
                await waiter
            finally:
                self.drained = None
        if self.reset:
            raise self.gone()

    # ------------------------------------------------------------------ libnghttp2's side

    cdef ssize_t fill(self, uint8_t *buf, size_t length, uint32_t *data_flags) except? -1:
        """The data provider: copy queued body into `buf`; end the body (and send trailers) when due."""
        cdef size_t written = 0
        cdef size_t n
        cdef Py_ssize_t left
        cdef bytes part
        while self.outbound and written < length:
            part = <bytes>self.outbound[0]
            left = PyBytes_GET_SIZE(part) - self.offset
            n = <size_t>left if <size_t>left <= length - written else length - written
            memcpy(buf + written, PyBytes_AS_STRING(part) + self.offset, n)
            written += n
            if n == <size_t>left:
                del self.outbound[0]
                self.offset = 0
            else:
                self.offset += n
        self.queued -= written
        if self.queued <= self.conn.send_buffer_bytes:
            _release(self.drained)
        if self.outbound or not self.body_ended:
            if written == 0:
                self.deferred = True
                return NGHTTP2_ERR_DEFERRED
            return written
        if self.wants_trailers:
            if not self.answered:
                if written == 0:
                    self.deferred = True
                    return NGHTTP2_ERR_DEFERRED
                return written
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
            if self.conn.submit_trailer(self.id, self.trailers) != 0:
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE  # this stream is reset, the connection lives
        else:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        self.complete = True
        return written

    cdef void ended_by(self, bint reset):
        """libnghttp2 closed the stream (reset: before its answer was complete)."""
        self.closed = True
        if self.unconsumed:  # what the app will not read any more: the connection's window back
            self.conn.consume(self.id, self.unconsumed)
            self.unconsumed = 0
        if reset:
            self.reset = True
            self.chunks = []
            task = self.task
            if task is not None and not task.done():
                task.cancel()
            _release(self.drained)
        self.wake()


cdef class Connection:
    """One HTTP/2 client connection (an asyncio Protocol) serving `app` (ASGI 3)."""

    cdef nghttp2_session *session
    cdef readonly object app
    cdef readonly object loop
    cdef object transport
    cdef dict streams
    cdef bint flush_pending
    cdef bint paused
    cdef readonly bint draining
    cdef object client
    cdef object server
    cdef str scheme
    cdef object owner
    cdef uint32_t max_concurrent_streams
    cdef int32_t stream_window
    cdef int32_t connection_window
    cdef readonly uint32_t max_header_list_bytes
    cdef public Py_ssize_t send_buffer_bytes

    def __cinit__(self):
        self.session = NULL
        self.streams = {}

    def __init__(self, app, *, owner=None, max_concurrent_streams=1024, stream_window_bytes=1 << 20,
                 connection_window_bytes=2 << 20, max_header_list_bytes=64 * 1024,
                 send_buffer_bytes=1 << 20, tls=False):
        self.app = app
        self.owner = owner
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window_bytes
        self.connection_window = connection_window_bytes
        self.max_header_list_bytes = max_header_list_bytes
        self.send_buffer_bytes = send_buffer_bytes
        self.scheme = "https" if tls else "http"

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL

    def __repr__(self):
        return f"<h2 Connection {self.client} streams={len(self.streams)} draining={self.draining}>"

    @property
    def open_streams(self):
        return len(self.streams)

    @property
    def unread_bytes(self):
        """Request bytes received and not yet taken by the app (they hold flow-control window)."""
        return sum((<Stream>stream).unconsumed for stream in self.streams.values())

    # ---------------------------------------------------------------------- asyncio Protocol

    def connection_made(self, transport):
        cdef nghttp2_option *option
        cdef nghttp2_settings_entry settings[3]
        cdef int rv
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None
        local = transport.get_extra_info("sockname")
        self.server = (local[0], local[1]) if isinstance(local, tuple) and len(local) >= 2 else None
        if nghttp2_option_new(&option) != 0:
            raise MemoryError()
        nghttp2_option_set_no_auto_window_update(option, 1)
        if _no_ws_validation != NULL:
            _no_ws_validation(option, 1)
        if _reset_rate_limit != NULL:
            _reset_rate_limit(option, RESET_BURST, RESET_RATE_PER_S)
        rv = nghttp2_session_server_new2(&self.session, _callbacks(), <void *>self, option)
        nghttp2_option_del(option)
        if rv != 0:
            raise H2Error(_error_text(rv))
        settings[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        settings[0].value = self.max_concurrent_streams
        settings[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        settings[1].value = <uint32_t>self.stream_window
        settings[2].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        settings[2].value = self.max_header_list_bytes
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, settings, 3)
        if self.connection_window > 65535:
            nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0, self.connection_window)
        if self.owner is not None:
            self.owner.connections.add(self)
        self.want_flush()

    def data_received(self, bytes data):
        cdef ssize_t rv
        if self.session == NULL:
            return
        rv = nghttp2_session_mem_recv(self.session, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if rv < 0:
            # Not HTTP/2 (a port scan, an HTTP/1.1 client) or a protocol error libnghttp2 answered
            # with GOAWAY: the client's doing, and not worth more than a debug line.
            log.debug("HTTP/2 connection from %s: %s; closing it", self.client, _error_text(<int>rv))
            self._flush()  # libnghttp2 may have queued a GOAWAY that says why
            if self.transport is not None:
                self.transport.close()
            return
        self.want_flush()

    def eof_received(self):
        return False  # close: HTTP/2 has no half-closed connections

    def connection_lost(self, exc):
        self.transport = None
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if not (<Stream>stream).closed:
                (<Stream>stream).ended_by(not (<Stream>stream).complete)
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL
        if self.owner is not None:
            self.owner.connections.discard(self)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.want_flush()

    # --------------------------------------------------------------------------- writing

    cdef void want_flush(self):
        if not self.flush_pending and self.transport is not None:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self):
        """Serialize every frame libnghttp2 has ready and write them in one piece."""
        cdef const uint8_t *data
        cdef ssize_t n
        self.flush_pending = False
        if self.session == NULL or self.transport is None or self.paused:
            return
        out = bytearray()
        while True:
            n = nghttp2_session_mem_send(self.session, &data)
            if n < 0:
                log.warning("HTTP/2 connection from %s: %s; closing it", self.client, _error_text(<int>n))
                self.transport.close()
                return
            if n == 0:
                break
            out += (<char *>data)[:n]
        if out:
            self.transport.write(out)
        if not nghttp2_session_want_read(self.session) and not nghttp2_session_want_write(self.session):
            self.transport.close()

    # ------------------------------------------------------------------ called by streams

    cdef void consume(self, int32_t stream_id, size_t size):
        """The app took `size` bytes of the stream: both windows open by as much."""
        if self.session != NULL:
            nghttp2_session_consume(self.session, stream_id, size)
            self.want_flush()

    cdef void resume(self, int32_t stream_id):
        if self.session != NULL:
            nghttp2_session_resume_data(self.session, stream_id)
            self.want_flush()

    cdef submit_response(self, Stream stream, object headers, bint with_body):
        cdef nghttp2_data_provider provider
        cdef nghttp2_nv *nva
        cdef Py_ssize_t count
        cdef int rv
        if self.session == NULL:
            raise ConnectionResetError(f"HTTP/2 stream {stream.id}: the connection is closed")
        fields = [(b":status", stream.status)]
        fields.extend(headers)
        count = len(fields)
        nva = <nghttp2_nv *>malloc(count * sizeof(nghttp2_nv))
        if nva == NULL:
            raise MemoryError()
        try:
            _fill_nv(nva, fields)
            provider.source.ptr = <void *>stream
            provider.read_callback = _read_body
            rv = nghttp2_submit_response(self.session, stream.id, nva, count, &provider if with_body else NULL)
        finally:
            free(nva)
        if rv != 0:
            raise H2Error(f"HTTP/2 stream {stream.id}: the response was refused: {_error_text(rv)}")
        self.want_flush()

    cdef int submit_trailer(self, int32_t stream_id, list trailers):
        cdef nghttp2_nv *nva
        cdef Py_ssize_t count = len(trailers)
        cdef int rv
        nva = <nghttp2_nv *>malloc(max(count, 1) * sizeof(nghttp2_nv))
        if nva == NULL:
            return -1
        try:
            _fill_nv(nva, trailers)
            rv = nghttp2_submit_trailer(self.session, stream_id, nva, count)
        finally:
            free(nva)
        return rv

    cdef void reset_stream(self, int32_t stream_id, uint32_t error_code):
        if self.session != NULL:
            nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, stream_id, error_code)
            self.want_flush()

    # ------------------------------------------------------------------------ lifecycle

    def drain(self, bint final=False):
        """Tell the client to open no new streams: a GOAWAY notice; `final`: GOAWAY with the last
        stream id processed (streams after it were refused and may be retried elsewhere)."""
        if self.session == NULL:
            return
        self.draining = True
        if final:
            nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(self.session), NGHTTP2_NO_ERROR, NULL, 0)
        else:
            nghttp2_submit_shutdown_notice(self.session)
        self.want_flush()

    def close(self):
        """Close the connection now: what is ready is written, then the socket is dropped without
        waiting for a client that does not read; streams still open end as reset (tasks cancelled)."""
        if self.transport is not None:
            self._flush()
            self.transport.abort()

    # ------------------------------------------------------------------------ the app side

    cdef void start(self, Stream stream):
        raw = stream.raw_path or b"/"
        path, _, query = raw.partition(b"?")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "2",
            "method": stream.method.decode("ascii", "replace") if stream.method else "",
            "scheme": self.scheme,
            "path": (unquote_to_bytes(path) if b"%" in path else path).decode("utf-8", "replace"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": stream.headers,
            "client": self.client,
            "server": self.server,
            "extensions": _EXTENSIONS,
        }
        stream.task = self.loop.create_task(self._run(stream, scope))

    async def _run(self, Stream stream, dict scope):
        try:
            await self.app(scope, stream.receive, stream.send)
        except asyncio.CancelledError:
            pass  # the stream was reset, or the server is stopping
        except BaseException:
            log.exception("the ASGI app failed on HTTP/2 stream %d (%s)", stream.id, scope["path"])
        finally:
            stream.task = None
            if not stream.answered and not stream.closed:
                self.reset_stream(stream.id, NGHTTP2_INTERNAL_ERROR)


cdef void _fill_nv(nghttp2_nv *nva, list fields):
    cdef Py_ssize_t i = 0
    cdef bytes name, value
    for name, value in fields:
        nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
        nva[i].namelen = PyBytes_GET_SIZE(name)
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = 0  # libnghttp2 copies both
        i += 1


# ---------------------------------------------------------------------- libnghttp2 callbacks
# They run inside nghttp2_session_mem_recv / mem_send, which are called with the GIL held.

cdef nghttp2_session_callbacks *_CALLBACKS = NULL


cdef nghttp2_session_callbacks *_callbacks() except NULL:
    global _CALLBACKS
    if _CALLBACKS == NULL:
        if nghttp2_session_callbacks_new(&_CALLBACKS) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_begin_headers_callback(_CALLBACKS, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(_CALLBACKS, _on_header)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_CALLBACKS, _on_data_chunk)
        nghttp2_session_callbacks_set_on_frame_recv_callback(_CALLBACKS, _on_frame_recv)
        nghttp2_session_callbacks_set_on_frame_send_callback(_CALLBACKS, _on_frame_send)
        nghttp2_session_callbacks_set_on_stream_close_callback(_CALLBACKS, _on_stream_close)
    return _CALLBACKS


cdef ssize_t _read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    try:
        return (<Stream>source.ptr).fill(buf, length, data_flags)
    except BaseException:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE  # this stream is reset, the connection lives


cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef Connection conn
    cdef Stream stream
    if frame.hd.type != NGHTTP2_HEADERS:
        return 0
    if nghttp2_session_get_stream_user_data(session, frame.hd.stream_id) != NULL:
        return 0  # the client's trailers: a gRPC client sends none, and they are ignored
    conn = <Connection>user_data
    try:
        stream = Stream(conn, frame.hd.stream_id)
        conn.streams[frame.hd.stream_id] = stream
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    nghttp2_session_set_stream_user_data(session, frame.hd.stream_id, <void *>stream)
    return 0


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                    const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef void *found
    cdef Stream stream
    if frame.hd.type != NGHTTP2_HEADERS:
        return 0
    found = nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    if found == NULL:
        return 0
    stream = <Stream>found
    if stream.started or stream.closed:
        return 0  # trailers
    # SETTINGS_MAX_HEADER_LIST_SIZE is only advertised by libnghttp2, not enforced: without this a
    # client could make one stream hold megabytes of fields (HPACK references to one large entry).
    stream.header_bytes += namelen + valuelen + 32
    if stream.header_bytes > (<Connection>user_data).max_header_list_bytes:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE  # this stream is reset, the connection lives
    try:
        if namelen and name[0] == 58:  # ':', a pseudo-header
            if namelen == 7 and memcmp(name, b":method", 7) == 0:
                stream.method = PyBytes_FromStringAndSize(<char *>value, valuelen)
            elif namelen == 5 and memcmp(name, b":path", 5) == 0:
                stream.raw_path = PyBytes_FromStringAndSize(<char *>value, valuelen)
            return 0
        stream.headers.append((PyBytes_FromStringAndSize(<char *>name, namelen),
                               PyBytes_FromStringAndSize(<char *>value, valuelen)))
    except BaseException:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE  # this stream is reset, the connection lives
    return 0


cdef int _on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                        size_t length, void *user_data) noexcept:
    cdef void *found
    cdef Stream stream
    found = nghttp2_session_get_stream_user_data(session, stream_id)
    if found == NULL or (<Stream>found).reset or (<Stream>found).complete:
        nghttp2_session_consume(session, stream_id, length)  # no one will read it: dropped
        return 0
    stream = <Stream>found
    try:
        stream.chunks.append(PyBytes_FromStringAndSize(<char *>data, length))
    except BaseException:  # (libnghttp2 ignores a non-fatal error here: reset the stream ourselves)
        nghttp2_session_consume(session, stream_id, length)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_INTERNAL_ERROR)
        return 0
    stream.unconsumed += length
    stream.wake()
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef void *found
    cdef Stream stream
    cdef uint8_t kind = frame.hd.type
    if kind != NGHTTP2_HEADERS and kind != NGHTTP2_DATA:
        return 0
    found = nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    if found == NULL:
        return 0
    stream = <Stream>found
    try:
        if kind == NGHTTP2_HEADERS and not stream.started:
            stream.started = True
            (<Connection>user_data).start(stream)
    except BaseException:  # (any error returned here would end the connection: reset the stream only)
        log.exception("HTTP/2 stream %d: the app could not be started", frame.hd.stream_id)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_INTERNAL_ERROR)
        return 0
    if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
        stream.request_ended = True
        stream.wake()
    return 0


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    """The answer's last frame left while the client is still sending: RST_STREAM(NO_ERROR) asks it to
    stop (RFC 9113 §8.1) instead of leaving it to reset the stream itself, which libnghttp2 would
    count against its rapid-reset limit (a refused large upload, one after another). Only once the
    last frame is out: a reset submitted earlier makes libnghttp2 drop the answer still queued."""
    cdef void *found
    if not (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) or (frame.hd.type != NGHTTP2_HEADERS
                                                          and frame.hd.type != NGHTTP2_DATA):
        return 0
    found = nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    if found != NULL and not (<Stream>found).request_ended:
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_NO_ERROR)
    return 0


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept:
    cdef Connection conn = <Connection>user_data
    cdef void *found = nghttp2_session_get_stream_user_data(session, stream_id)
    cdef Stream stream
    if found == NULL:
        return 0
    stream = <Stream>found
    try:
        conn.streams.pop(stream_id, None)
        stream.ended_by(not stream.complete)
    except BaseException:
        pass
    return 0
