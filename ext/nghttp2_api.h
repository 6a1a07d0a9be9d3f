/* The part of libnghttp2's public C API (soname libnghttp2.so.14, 1.x) that ext/h2server.pyx uses.
 *
 * Declared here rather than included because Debian and most distributions ship the library (curl
 * and Apache depend on it) without its development headers, and the build should need nothing more
 * than what `make` can count on. The types, values and prototypes are the library's documented,
 * stable ABI (https://nghttp2.org/documentation/apiref.html); nothing beyond it is assumed: a frame
 * is read only through its header, which every member of nghttp2_frame starts with.
 */
#ifndef TENSORGATE_NGHTTP2_API_H
#define TENSORGATE_NGHTTP2_API_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  size_t length;
  int32_t stream_id;
  uint8_t type;
  uint8_t flags;
  uint8_t reserved;
} nghttp2_frame_hd;

/* Every frame type's struct starts with its header; only the header is read here. */
typedef union {
  nghttp2_frame_hd hd;
} nghttp2_frame;

typedef struct {
  uint8_t *name;
  uint8_t *value;
  size_t namelen;
  size_t valuelen;
  uint8_t flags;
} nghttp2_nv;

typedef union {
  int fd;
  void *ptr;
} nghttp2_data_source;

typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);

typedef struct {
  nghttp2_data_source source;
  nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef struct {
  int32_t settings_id;
  uint32_t value;
} nghttp2_settings_entry;

typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *session,
                                                 const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *session, const nghttp2_frame *frame,
                                          const uint8_t *name, size_t namelen,
                                          const uint8_t *value, size_t valuelen, uint8_t flags,
                                          void *user_data);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *session, uint8_t flags,
                                                   int32_t stream_id, const uint8_t *data,
                                                   size_t len, void *user_data);
typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *session,
                                              const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_frame_send_callback)(nghttp2_session *session,
                                              const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *session, int32_t stream_id,
                                                uint32_t error_code, void *user_data);

/* Frame types, flags, settings, error codes (RFC 9113) and the library's own error values. */
enum {
  NGHTTP2_DATA = 0x00,
  NGHTTP2_HEADERS = 0x01,
  NGHTTP2_FLAG_NONE = 0x00,
  NGHTTP2_FLAG_END_STREAM = 0x01,
  NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS = 0x03,
  NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE = 0x04,
  NGHTTP2_SETTINGS_MAX_FRAME_SIZE = 0x05,
  NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE = 0x06,
  NGHTTP2_NO_ERROR = 0x00,
  NGHTTP2_PROTOCOL_ERROR = 0x01,
  NGHTTP2_INTERNAL_ERROR = 0x02,
  NGHTTP2_CANCEL = 0x08,
  NGHTTP2_DATA_FLAG_EOF = 0x01,
  NGHTTP2_DATA_FLAG_NO_END_STREAM = 0x02,
  NGHTTP2_ERR_DEFERRED = -508,
  NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE = -521,
  NGHTTP2_ERR_CALLBACK_FAILURE = -902
};

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *cbs,
                                                             nghttp2_on_begin_headers_callback cb);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *cbs,
                                                      nghttp2_on_header_callback cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *cbs,
                                                          nghttp2_on_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *cbs,
                                                          nghttp2_on_frame_send_callback cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *cbs,
                                                            nghttp2_on_stream_close_callback cb);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);

int nghttp2_session_server_new2(nghttp2_session **session_ptr,
                                const nghttp2_session_callbacks *callbacks, void *user_data,
                                const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
                                          int32_t stream_id, int32_t window_size);
void *nghttp2_session_get_stream_user_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_set_stream_user_data(nghttp2_session *session, int32_t stream_id,
                                         void *stream_user_data);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);

int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
                            const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva,
                            size_t nvlen, const nghttp2_data_provider *data_prd);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva,
                           size_t nvlen);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                              uint32_t error_code);
int nghttp2_submit_shutdown_notice(nghttp2_session *session);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
                          uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len);
const char *nghttp2_strerror(int lib_error_code);

#endif
