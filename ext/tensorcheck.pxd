cpdef Py_ssize_t bytes_element_count(const unsigned char[::1] data) except -2
cpdef Py_ssize_t bytes_longest_element(const unsigned char[::1] data) except -2
