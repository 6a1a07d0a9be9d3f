"""Native kernels of the gateway (Cython), each with a plain NumPy/Python twin of the same signature.

`TENSORGATE_NO_EXTENSIONS=1` selects the twins, as aiohttp's AIOHTTP_NO_EXTENSIONS does; tests run
both and compare. `USING_EXTENSIONS` says which are loaded.
"""

from __future__ import annotations

import os

USING_EXTENSIONS = not os.environ.get("TENSORGATE_NO_EXTENSIONS")

if USING_EXTENSIONS:
    from gateway.ext.batching import bytes_typed_to_raw, gather, gather_into, scatter, scatter_bytes, typed_to_raw
    from gateway.ext.histogram import BucketCounts
    from gateway.ext.tensorcheck import bytes_element_count, bytes_longest_element
else:
    from gateway.ext.batching_py import (
        bytes_typed_to_raw,
        gather,
        gather_into,
        scatter,
        scatter_bytes,
        typed_to_raw,
    )
    from gateway.ext.histogram_py import BucketCounts
    from gateway.ext.tensorcheck_py import bytes_element_count, bytes_longest_element

__all__ = [
    "USING_EXTENSIONS",
    "BucketCounts",
    "bytes_element_count",
    "bytes_longest_element",
    "bytes_typed_to_raw",
    "gather",
    "gather_into",
    "scatter",
    "scatter_bytes",
    "typed_to_raw",
]
