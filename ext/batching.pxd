# Declarations of batching.pyx for other Cython modules (`from gateway.ext.batching cimport gather`).

cpdef bytearray gather(object parts)
cpdef Py_ssize_t gather_into(object parts, object out, Py_ssize_t offset=*) except -1
cpdef bytes typed_to_raw(object values, str datatype)
cpdef bytes bytes_typed_to_raw(object values)
cpdef list scatter(object buffer, object row_counts, Py_ssize_t row_bytes)
cpdef list scatter_bytes(object buffer, object element_counts)
