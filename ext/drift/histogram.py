"""Binned counts of every monitored feature against per-feature bin edges, updated once per block.

Layout of a histogram of F features and B bins: `counts: int64[F, B + 4]`, where, per feature,

    counts[:, :B]      values in bin i = [edges[i], edges[i + 1]) (the last bin is closed: [e_B-1, e_B])
    counts[:, B]       BELOW: finite values < edges[0]
    counts[:, B + 1]   ABOVE: finite values > edges[B]
    counts[:, B + 2]   NAN
    counts[:, B + 3]   INF: +inf and -inf (never counted as below or above)

Column offsets from the end are BELOW = -4, ABOVE = -3, NAN = -2, INF = -1, so `counts[:, NAN]` works
for any B. Histograms of the same edges are merged by adding their counts.

`update_histogram` is the hot-path kernel (one call per request or batch block). A plain binary
search costs ~30 ns a value on random data here: LLVM turns its selects into branches that
mispredict half the time. Instead each call maps values to a uniform grid of cells first (see
`_cell_table`), which leaves one branch-free comparison a value (~3 ns). The edges of each feature must be
sorted (strictly increasing, as `quantile_edges` makes them); unsorted or NaN edges give wrong
counts, never an out-of-bounds access. `quantile_edges` runs off the hot path, once per reference, and
is plain NumPy.
"""

from __future__ import annotations

import numba
import numpy as np

EXTRA_COLUMNS = 4
BELOW, ABOVE, NAN, INF = -4, -3, -2, -1

MAX_BINS = 65536  # the cell table holds bin numbers as uint16: small enough to stay in L1 at B = 64
_SHAPE_ERROR = ("histogram shapes must be counts int64[F, B+4], edges float64[F, B+1] (1 <= B <= 65536), "
                "block [R, F]")


@numba.njit(nogil=True, cache=True)
def _cell_table(edges, cells):
    """A uniform grid of `cells` cells over each feature's interior edges, and where each cell's search starts.

    cell(x) = int(clamp((x - origin) * scale, 0, cells)), origin = e_1, scale = cells / (e_B-1 - e_1),
    is monotone in x, so a value v of cell g lies in a bin between the first and the last bin of the
    interior edges sharing cell g: the search starts at start[f, g] and needs at most `steps`
    comparisons (the most interior edges in one cell). The grid spans the interior edges only, not
    [e_0, e_B]: the outer bins take the tails, so a heavy tail (Cauchy) does not stretch the grid. With
    quantile edges `steps` is 1 at 4-64 cells a bin. A feature whose interior span is empty or not
    finite gets scale 0: one cell, a linear search. `bounds[f]` is the feature's range with ±inf edges
    pulled in to ±max float, so that the range check alone keeps ±inf out of the bins.
    """
    features = edges.shape[0]
    bins = edges.shape[1] - 1
    origin = np.zeros(features, np.float64)
    scale = np.zeros(features, np.float64)
    bounds = np.empty((features, 2), np.float64)
    start = np.zeros((features, cells + 1), np.uint16)
    largest = np.finfo(np.float64).max
    steps = 0
    for feature in range(features):
        low, high = edges[feature, 0], edges[feature, bins]
        bounds[feature, 0] = low if low > -np.inf else -largest  # NaN -> -largest: harmless, see below
        bounds[feature, 1] = high if high < np.inf else largest
        span = edges[feature, bins - 1] - edges[feature, 1]
        feature_scale = cells / span if span > 0.0 else 0.0
        if 0.0 < feature_scale < np.inf:
            origin[feature] = edges[feature, 1]
            scale[feature] = feature_scale
        for index in range(1, bins):  # count the interior edges in each cell
            position = (edges[feature, index] - origin[feature]) * scale[feature]
            cell = 0
            if position >= cells:
                cell = cells
            elif position > 0.0:  # False for NaN: unsorted or NaN edges give wrong counts, never a wild index
                cell = int(position)
            start[feature, cell] += 1
        first_bin = 0
        for cell in range(cells + 1):  # exclusive prefix sum: the bin of the cell's left end
            inside = start[feature, cell]
            steps = max(steps, inside)
            start[feature, cell] = first_bin
            first_bin += inside
    last_start = bins - 1 - steps  # keep every search window inside [0, bins)
    for feature in range(features):
        for cell in range(cells + 1):
            start[feature, cell] = min(start[feature, cell], last_start)
    return origin, scale, bounds, start, steps


# Rows counted per tile. The loops run feature by feature inside a tile: one feature's edges, cell
# table, bounds and counts stay in registers and L1 for the whole tile (row-major, with the feature
# inner, every value reloaded them and paid Numba's negative-index checks: 5.3 ns/value against 2.2-2.6
# here), and 256 rows x 16 features x 8 bytes = 32 KiB of block stays in L1/L2 while each of its
# columns is read (one pass per feature over a whole large block was memory-bound: 4.3 ns/value in f64).
TILE_ROWS = 256


@numba.njit(nogil=True, cache=True)
def _count_block(counts, edges, block, origin, scale, bounds, start, steps, tails, outer, track_tails):
    """The shared loop of `update_histogram` and `update_cdf` (see their docstrings).

    Within a feature, values are met in row order (tile after tile), so the outer values of `update_cdf`
    keep their arrival order and the tail sums add in the same order as a row-by-row loop.
    """
    features = edges.shape[0]
    bins = edges.shape[1] - 1
    cells = start.shape[1] - 1
    one = np.uint64(1)
    last_cell = np.float64(cells)
    total_rows = block.shape[0]
    for first_row in range(0, total_rows, TILE_ROWS):
        rows = min(TILE_ROWS, total_rows - first_row)
        for feature in range(features):
            feature_edges = edges[feature]
            feature_counts = counts[feature]
            feature_start = start[feature]
            low, high = bounds[feature, 0], bounds[feature, 1]
            feature_origin, feature_scale = origin[feature], scale[feature]
            column = block[first_row:first_row + rows, feature]
            for row in range(rows):
                value = np.float64(column[row])
                if low <= value <= high:  # False for NaN and ±inf
                    # A NaN edge fails the comparisons (or gives scale 0 and cell 0): wrong bin, valid index.
                    position = min(max((value - feature_origin) * feature_scale, 0.0), last_cell)  # maxsd, minsd
                    cell = np.uint64(np.int64(position))  # signed cvttsd2si: fptoui is several instructions
                    bin_index = np.uint64(feature_start[cell])
                    if steps == 1:  # the common case, without the loop's bookkeeping
                        bin_index += np.uint64(feature_edges[bin_index + one] <= value)
                    else:
                        for _ in range(steps):
                            bin_index += np.uint64(feature_edges[bin_index + one] <= value)
                    feature_counts[bin_index] += 1
                elif np.isnan(value):
                    feature_counts[bins + 2] += 1
                elif np.isinf(value):
                    feature_counts[bins + 3] += 1
                else:  # finite, outside the fast range: out of range, or (update_cdf) in an outer bin
                    if value < feature_edges[0]:
                        feature_counts[bins] += 1
                    elif value > feature_edges[bins]:
                        feature_counts[bins + 1] += 1
                    elif value < feature_edges[1]:
                        feature_counts[0] += 1
                    else:
                        feature_counts[bins - 1] += 1
                    if track_tails:
                        tails[feature, 0 if value < feature_edges[1] else 1] += value
                        stored = (feature_counts[0] + feature_counts[bins - 1] + feature_counts[bins]
                                  + feature_counts[bins + 1] - 1)  # outer values before this one
                        if stored < outer.shape[1]:
                            outer[feature, stored] = value
    return counts


@numba.njit(nogil=True, cache=True)
def update_histogram(counts, edges, block):
    """Add the values of `block[R, F]` to `counts[F, B+4]` against `edges[F, B+1]`; returns `counts`.

    Updated in place, a tile of rows at a time, feature by feature within it. Per in-range value: one multiply to find its cell, one table load and `steps` branch-free
    comparisons (unsigned indices, so no negative-index wrap-around code either). The cell table is
    built on every call; `update_cdf` takes one built once (`cell_index`).
    """
    features = edges.shape[0]
    bins = edges.shape[1] - 1
    if (bins < 1 or bins > MAX_BINS or counts.shape[0] != features or counts.shape[1] != bins + 4
            or block.shape[1] != features):
        raise ValueError(_SHAPE_ERROR)
    # Building the table costs F x cells a call: 4 cells a bin for small blocks; large blocks refine
    # the grid while some cell still holds several edges, up to 256 cells a bin.
    cells = 4 * bins
    origin, scale, bounds, start, steps = _cell_table(edges, cells)
    while steps > 1 and cells < 256 * bins and features * cells * 64 <= block.shape[0] * features:
        cells *= 4
        origin, scale, bounds, start, steps = _cell_table(edges, cells)
    no_tails = np.zeros((1, 2), np.float64)
    no_outer = np.zeros((1, 0), np.float64)
    return _count_block(counts, edges, block, origin, scale, bounds, start, steps, no_tails, no_outer, False)


def cell_index(edges, cells_per_bin: int = 4):
    """The cell table of `edges` for `update_cdf`, built once per reference: (origin, scale, bounds, start, steps).

    Refined (x4 cells) while some cell holds several edges, up to 64 x `cells_per_bin` cells a bin.
    Its `bounds` are the inner edges [e_1, e_B-1): values of the two outer bins take the slow path,
    which adds them to the tail sums, so the fast path has no tail branch (2 values in B take it).
    """
    edges = np.ascontiguousarray(edges, np.float64)
    bins = edges.shape[1] - 1
    if bins < 2:
        raise ValueError("update_cdf needs at least 2 bins")
    cells = cells_per_bin * bins
    origin, scale, bounds, start, steps = _cell_table(edges, cells)
    while steps > 1 and cells < 64 * cells_per_bin * bins:
        cells *= 4
        origin, scale, bounds, start, steps = _cell_table(edges, cells)
    bounds[:, 0] = edges[:, 1]
    bounds[:, 1] = np.nextafter(edges[:, bins - 1], -np.inf)  # value <= bound  <=>  value < e_B-1
    return origin, scale, bounds, start, steps


@numba.njit(nogil=True, cache=True)
def update_cdf(counts, tails, outer, edges, origin, scale, bounds, start, steps, block):
    """`update_histogram` with a prebuilt cell table (`cell_index(edges, ...)`) and the outer values; returns `counts`.

    `tails: float64[F, 2]` accumulates, per feature, the sum of the finite values left of e_1 (BELOW
    and bin 0) and right of e_B-1 (bin B-1 and ABOVE): with the counts, the exact integral of each
    CDF over the two outer bins and beyond (wasserstein.py). `outer: float64[F, C]` keeps those values
    themselves, in arrival order, the first C of them (the k-th outer value of a feature is at
    outer[f, k], k counted from the counts' outer columns, so `counts` must start at zero with it):
    with all of them, W1 over the outer regions is exact even where the CDFs cross there (a heavy
    tail's few values). Meant for fine CDF bins (256 and more), where building the table on every
    call would cost more than counting a small block; outer values take the slow path (2 in B).
    """
    features = edges.shape[0]
    bins = edges.shape[1] - 1
    if (bins < 2 or bins > MAX_BINS or counts.shape[0] != features or counts.shape[1] != bins + 4
            or block.shape[1] != features or tails.shape[0] != features or tails.shape[1] != 2
            or outer.shape[0] != features
            or start.shape[0] != features or origin.shape[0] != features or bounds.shape[0] != features
            or steps < 0 or steps > bins - 1):
        raise ValueError(_SHAPE_ERROR + ", tails float64[F, 2] and the cell index of edges")
    return _count_block(counts, edges, block, origin, scale, bounds, start, steps, tails, outer, True)


def update_cdf_numpy(counts, tails, outer, edges, origin, scale, bounds, start, steps, block):
    """NumPy twin of `update_cdf` (the cell index is not needed, and ignored)."""
    edges, block = np.asarray(edges), np.asarray(block)
    if tails.shape != (edges.shape[0], 2) or edges.shape[1] < 3 or outer.shape[0] != edges.shape[0]:
        raise ValueError(_SHAPE_ERROR + ", tails float64[F, 2] and the cell index of edges")
    bins = edges.shape[1] - 1
    stored = counts[:, 0] + counts[:, bins - 1] + counts[:, bins] + counts[:, bins + 1]
    update_histogram_numpy(counts, edges, block)
    for feature in range(edges.shape[0]):
        column = block[:, feature].astype(np.float64)
        outside = np.isfinite(column) & ((column < edges[feature, 1]) | (column >= edges[feature, -2]))
        values = column[outside]  # in row order, as the kernel meets them
        tails[feature, 0] += values[values < edges[feature, 1]].sum()
        tails[feature, 1] += values[values >= edges[feature, 1]].sum()
        room = max(0, outer.shape[1] - int(stored[feature]))
        outer[feature, int(stored[feature]):int(stored[feature]) + min(room, values.size)] = values[:room]
    return counts


def coarsen(counts, refine: int) -> np.ndarray:
    """A histogram int64[F, B+4] of fine bins -> int64[F, B/refine + 4]: each run of `refine` bins summed."""
    counts = np.asarray(counts)
    fine_bins = counts.shape[1] - EXTRA_COLUMNS
    if refine < 1 or fine_bins % refine:
        raise ValueError(f"{fine_bins} bins do not split into runs of {refine}")
    inside = counts[:, :fine_bins].reshape(counts.shape[0], fine_bins // refine, refine).sum(axis=2)
    return np.concatenate([inside, counts[:, fine_bins:]], axis=1)


def update_histogram_numpy(counts, edges, block):
    """NumPy twin of `update_histogram`: same arguments, same counts, same in-place update."""
    counts, edges, block = np.asarray(counts), np.asarray(edges), np.asarray(block)
    features, bins = edges.shape[0], edges.shape[1] - 1
    if (bins < 1 or bins > MAX_BINS or counts.shape != (features, bins + EXTRA_COLUMNS) or block.ndim != 2
            or block.shape[1] != features):
        raise ValueError(_SHAPE_ERROR)
    for feature in range(features):
        column = block[:, feature].astype(np.float64)
        feature_edges = edges[feature]
        nan = np.isnan(column)
        inf = np.isinf(column)
        finite = column[~(nan | inf)]
        below = finite < feature_edges[0]
        above = finite > feature_edges[-1]
        inside = finite[~(below | above)]
        index = np.minimum(np.searchsorted(feature_edges, inside, side="right") - 1, bins - 1)
        counts[feature, :bins] += np.bincount(index, minlength=bins)
        counts[feature, bins:] += [below.sum(), above.sum(), nan.sum(), inf.sum()]
    return counts


def new_histogram(edges) -> np.ndarray:
    """Zero counts for `edges[F, B+1]`: int64[F, B+4]."""
    edges = np.asarray(edges)
    return np.zeros((edges.shape[0], edges.shape[1] - 1 + EXTRA_COLUMNS), np.int64)


def quantile_edges(reference, bins: int) -> np.ndarray:
    """Per-feature edges float64[F, bins+1] at the quantiles 0, 1/bins, …, 1 of the finite reference values.

    Every bin of the reference then holds about the same mass. Edges are made strictly increasing (as
    `update_histogram` needs) by raising any edge that is not above the previous one to the next float
    after it (`np.nextafter`): a value repeated across several quantiles (a constant feature, a discrete
    feature's atom, fewer rows than bins) keeps its own bin [v, nextafter(v)), which holds exactly v, and
    the bins after it are empty in the reference. A feature with no finite reference value gets the
    placeholder edges 0, 1, …, bins.
    """
    reference = np.asarray(reference, np.float64)
    if reference.ndim != 2:
        raise ValueError(f"reference must be [N, F], got shape {reference.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    levels = np.linspace(0.0, 1.0, bins + 1)
    edges = np.empty((reference.shape[1], bins + 1), np.float64)
    for feature in range(reference.shape[1]):
        column = reference[:, feature]
        finite = column[np.isfinite(column)]
        edges[feature] = np.quantile(finite, levels) if finite.size else np.arange(bins + 1, dtype=np.float64)
        for index in range(1, bins + 1):
            if not edges[feature, index] > edges[feature, index - 1]:
                edges[feature, index] = np.nextafter(edges[feature, index - 1], np.inf)
    return edges


# ---------------------------------------------------------------- folded tails, for PSI / JS / chi²
# The statistics that compare bin shares fold BELOW into the first in-range bin and ABOVE into the
# last (NAN and INF are left out); frequency tables [F, K] are used as they are (fold=False).


def fold_tails(counts) -> np.ndarray:
    """int64[F, B]: a histogram's in-range bins with BELOW added to the first and ABOVE to the last."""
    counts = np.asarray(counts)
    folded = counts[:, :-EXTRA_COLUMNS].copy()
    folded[:, 0] += counts[:, BELOW]
    folded[:, -1] += counts[:, ABOVE]
    return folded


@numba.njit(nogil=True, cache=True)
def folded_count(counts, feature, index, bins, fold):
    """counts[feature, index] as a float, with BELOW / ABOVE added to the edge bins when `fold`."""
    count = np.float64(counts[feature, index])
    if fold and index == 0:
        count += counts[feature, bins]
    if fold and index == bins - 1:
        count += counts[feature, bins + 1]
    return count


_SAME_SHAPE = "reference and current must be count tables of the same shape"


@numba.njit(nogil=True, cache=True)
def check_same_shape(reference, current, bins):
    if current.shape[0] != reference.shape[0] or current.shape[1] != reference.shape[1] or bins < 1:
        raise ValueError(_SAME_SHAPE)


def count_tables_numpy(reference, current) -> tuple[np.ndarray, np.ndarray]:
    """Two frequency tables [F, K] as float64, for the NumPy twins; the same check as check_same_shape."""
    reference, current = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    if reference.shape != current.shape:
        raise ValueError(_SAME_SHAPE)
    return reference, current


@numba.njit(nogil=True, cache=True)
def folded_totals(reference, current, feature, bins, fold):
    """(reference total, current total) of one feature's counted values (NAN / INF left out)."""
    reference_total = 0.0
    current_total = 0.0
    for index in range(bins):
        reference_total += folded_count(reference, feature, index, bins, fold)
        current_total += folded_count(current, feature, index, bins, fold)
    return reference_total, current_total
