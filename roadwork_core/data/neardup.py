"""Near-duplicate groups from perceptual hashes, without an O(n^2) Python loop.

Two images are near-duplicates when the Hamming distance between their 64-bit perceptual hashes
(`imagehash.phash`, stored as 16 hex characters) is at most `radius`. Groups are the connected
components of that graph, so a chain a~b~c lands in one group even if a and c are far apart.

Candidate pairs come from a multi-index (pigeonhole) search: split the 64 bits into `radius + 1`
disjoint bands; two hashes within distance `radius` differ in at most `radius` bands, so they agree
exactly on at least one band. Per band we sort the band values and compare each hash with its
neighbours inside the same bucket, all in numpy; the work is proportional to the number of
candidate pairs (about n^2 / 2^(64 / (radius + 1)) per band for spread-out hashes), not to n^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
HEX_CHARS = HASH_BITS // 4


def phash_to_uint64(phashes: Sequence[str]) -> np.ndarray:
    """Parse 16-hex-character perceptual hashes into a uint64 array (n,)."""
    values: list[int] = []
    for row, h in enumerate(phashes):
        if not isinstance(h, str) or len(h) != HEX_CHARS:
            raise ValueError(
                f"phash at row {row} is {h!r}; expected a {HEX_CHARS}-character hex string "
                f"(str(imagehash.phash(image)) with the default hash_size=8); recompute the image table's phash"
            )
        try:
            values.append(int(h, 16))
        except ValueError as exc:
            raise ValueError(
                f"phash at row {row} is {h!r}, which is not hexadecimal; recompute the image table's phash"
            ) from exc
    return np.array(values, dtype=np.uint64)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance between two uint64 arrays of the same shape."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _check_radius(radius: int) -> None:
    if not isinstance(radius, (int, np.integer)) or not 0 <= radius < HASH_BITS:
        raise ValueError(f"radius must be an integer in [0, {HASH_BITS - 1}], got {radius!r}")


def _band_masks(radius: int) -> list[tuple[int, int]]:
    """(shift, mask) of `radius + 1` disjoint bands covering all 64 bits, widths as equal as possible."""
    n_bands = radius + 1
    widths = [HASH_BITS // n_bands + (1 if i < HASH_BITS % n_bands else 0) for i in range(n_bands)]
    bands, shift = [], 0
    for w in widths:
        bands.append((shift, (1 << w) - 1))
        shift += w
    return bands


def _pairs_sharing_band(hashes: np.ndarray, shift: int, mask: int, radius: int) -> np.ndarray:
    """Pairs (i, j), i < j, equal on one band and within `radius` overall: (P, 2) int64."""
    band = (hashes >> np.uint64(shift)) & np.uint64(mask)  # (n,)
    order = np.argsort(band, kind="stable")  # (n,) hashes sorted by band value
    band_sorted, hash_sorted = band[order], hashes[order]
    found: list[np.ndarray] = []
    # Sorted by band value, so if position i matches i+k it also matches i+1..i+k-1: the set of
    # positions still inside their bucket only shrinks with k, and the loop ends at the largest bucket.
    active = np.arange(len(hashes) - 1)
    k = 1
    while active.size:
        partner = active + k
        active = active[band_sorted[active] == band_sorted[partner]]
        partner = active + k
        close = hamming_distance(hash_sorted[active], hash_sorted[partner]) <= radius
        if close.any():
            found.append(np.stack([order[active[close]], order[partner[close]]], axis=1))
        k += 1
        active = active[active + k < len(hashes)]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    return np.sort(pairs, axis=1)


def near_duplicate_pairs(phashes: Sequence[str], radius: int = 6) -> np.ndarray:
    """Index pairs (i, j), i < j, whose phash Hamming distance is <= radius: (P, 2) int64, sorted.

    Distances for the pairs: `pair_distances(phashes, pairs)`.
    """
    _check_radius(radius)
    hashes = phash_to_uint64(phashes)
    n = len(hashes)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    found = [_pairs_sharing_band(hashes, shift, mask, radius) for shift, mask in _band_masks(radius)]
    pairs = np.concatenate(found)
    # a pair may agree on several bands: keep each once, in (i, j) order
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1).astype(np.int64)


def pair_distances(phashes: Sequence[str], pairs: np.ndarray) -> np.ndarray:
    """Hamming distances (P,) for index pairs (P, 2) into `phashes`."""
    hashes = phash_to_uint64(phashes)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return hamming_distance(hashes[pairs[:, 0]], hashes[pairs[:, 1]])


def near_duplicate_groups(
    phashes: Sequence[str], radius: int = 6, ids: Sequence[str] | None = None
) -> np.ndarray:
    """Group label per image: connected components of "phash Hamming distance <= radius".

    Without `ids`: int64 labels (n,), numbered 0, 1, ... in order of each group's first row.
    With `ids` (e.g. image_id): object array (n,) holding the smallest id in each image's group,
    a label that depends only on the group's content, not on row order.
    """
    n = len(phashes)
    if ids is not None and len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but phashes has {n}; pass one id per phash")
    pairs = near_duplicate_pairs(phashes, radius)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)  # (n,) arbitrary component numbers
    # renumber by first occurrence so the int labels are stable for a given row order
    _, first_row, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first_row)
    rank[np.argsort(first_row)] = np.arange(len(first_row))
    labels = rank[inverse].astype(np.int64)
    if ids is None:
        return labels
    ids_arr = np.asarray(ids, dtype=object)
    if n == 0:
        return ids_arr
    min_id = np.empty(labels.max() + 1, dtype=object)
    for label, ident in zip(labels.tolist(), ids_arr.tolist()):
        if min_id[label] is None or ident < min_id[label]:
            min_id[label] = ident
    return min_id[labels]
