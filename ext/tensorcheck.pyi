def bytes_element_count(data: bytes | memoryview) -> int:
    """Elements of a raw BYTES tensor (4-byte little-endian length prefixes), or -1 if corrupt."""

def bytes_longest_element(data: bytes | memoryview) -> int:
    """Length of the longest element of a raw BYTES tensor (0 if none), or -1 if corrupt."""
