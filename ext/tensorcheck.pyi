def bytes_element_count(data: bytes | memoryview) -> int:
    """Elements of a raw BYTES tensor (4-byte little-endian length prefixes), or -1 if corrupt."""
