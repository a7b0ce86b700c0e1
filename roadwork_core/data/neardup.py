"""Near-duplicate groups from perceptual hashes, without an O(n^2) Python loop.

Two images are near-duplicates when the Hamming distance between their 64-bit perceptual hashes
(`imagehash.phash`, stored as 16 hex characters) is at most `radius`. Groups are the connected
components of that graph, so a chain a~b~c lands in one group even if a and c are far apart.

Flips and quarter turns: a mirrored copy, or a photo whose EXIF orientation tag was changed (the
image is decoded upright, so the tag turns into a rotation), has a phash ~32 bits from its original.
`dihedral_phashes` also hashes the 7 other flips/rotations of an image (column `phash_dihedral`);
given them, two images are near-duplicates when any flip/rotation of one is within `radius` of the
other. Crops, padding, small rotations and overlays are out of a perceptual hash's reach (see README,
"Splits and the split contract").

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
N_VARIANTS = 7  # the flips and rotations of the dihedral group other than the identity
_PHASH_SIDE = 32  # imagehash.phash reduces the image to 32 x 32 grey (hash_size 8 x highfreq_factor 4)
_MAX_CANDIDATES = 4_000_000  # candidate pairs compared at once by the variant search (memory bound)


def dihedral_phashes(img) -> tuple[str, str]:
    """(phash, phash_dihedral) of a decoded PIL image.

    phash is `str(imagehash.phash(img))`. phash_dihedral holds the phashes of the image flipped left-right,
    flipped top-bottom, rotated 90 / 180 / 270 degrees, transposed and transversed, space-separated.
    They are taken from the 32 x 32 grey image phash itself reduces to, so the 7 extra hashes cost 7 small
    DCTs, not 7 more resizes; flipping and resizing commute, so each matches the phash of the flipped
    full-size image to within a bit or two.
    """
    import imagehash
    from PIL import Image

    small = img.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    phash = str(imagehash.phash(small))  # equal to imagehash.phash(img): it does the same reduction
    ops = (
        Image.Transpose.FLIP_LEFT_RIGHT,
        Image.Transpose.FLIP_TOP_BOTTOM,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    )
    return phash, " ".join(str(imagehash.phash(small.transpose(op))) for op in ops)


def variants_to_uint64(variants: Sequence[str | None], hashes: np.ndarray) -> np.ndarray:
    """Parse `phash_dihedral` strings (7 space-separated hex hashes each) into a (n, 7) uint64 array.

    A missing entry (None, NaN, ""; a row from a table written before the column existed) stands for
    the upright hash `hashes[row]` 7 times: that image is compared upright only."""
    out = np.empty((len(variants), N_VARIANTS), dtype=np.uint64)
    for row, text in enumerate(variants):
        if text is None or text == "" or (isinstance(text, float) and np.isnan(text)):
            out[row] = hashes[row]
            continue
        parts = text.split() if isinstance(text, str) else []
        if len(parts) != N_VARIANTS:
            raise ValueError(
                f"phash_dihedral at row {row} is {text!r}; expected {N_VARIANTS} space-separated "
                f"{HEX_CHARS}-character hex hashes (dihedral_phashes); recompute the image table"
            )
        out[row] = phash_to_uint64(parts)
    return out


def table_hashes(table) -> tuple[list[str], list[str] | None]:
    """(phash, phash_dihedral or None) columns of an image / splits table, for the functions below.
    Tables written before phash_dihedral existed give None: those compare upright hashes only."""
    variants = table["phash_dihedral"].tolist() if "phash_dihedral" in table.columns else None
    return table["phash"].tolist(), variants


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


def _variant_pairs(hashes: np.ndarray, variants: np.ndarray, radius: int) -> np.ndarray:
    """Pairs (i, j), i < j, where some flip/rotation of one image is within `radius` of the other.

    Queries are the (n * 7) variant hashes, the index the n upright ones; per band, a query is compared
    with the index hashes in its bucket only (never variant with variant), in chunks of at most
    `_MAX_CANDIDATES` comparisons."""
    n = len(hashes)
    queries = variants.reshape(-1)  # (7n,) row-major: query q belongs to image q // 7
    owner = np.repeat(np.arange(n, dtype=np.int64), N_VARIANTS)
    found: list[np.ndarray] = []
    for shift, mask in _band_masks(radius):
        band = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(band, kind="stable")
        band_sorted = band[order]
        qband = (queries >> np.uint64(shift)) & np.uint64(mask)
        left = np.searchsorted(band_sorted, qband, side="left")
        counts = np.searchsorted(band_sorted, qband, side="right") - left  # (7n,) bucket sizes
        ends = np.cumsum(counts)
        start = 0
        while start < len(queries):
            done = ends[start - 1] if start else 0  # candidates before this chunk
            stop = max(start + 1, int(np.searchsorted(ends, done + _MAX_CANDIDATES, side="right")))
            sizes = counts[start:stop]
            q = np.repeat(np.arange(start, stop), sizes)  # (C,) one row per candidate
            first = np.cumsum(sizes) - sizes  # (stop - start,) where each query's candidates begin
            offset = np.arange(len(q)) - np.repeat(first, sizes)  # position inside the query's bucket
            i = order[left[q] + offset]
            close = (hamming_distance(queries[q], hashes[i]) <= radius) & (owner[q] != i)
            if close.any():
                found.append(np.stack([owner[q[close]], i[close]], axis=1))
            start = stop
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.sort(np.concatenate(found).astype(np.int64), axis=1)


def near_duplicate_pairs(
    phashes: Sequence[str], radius: int = 6, variants: Sequence[str] | None = None
) -> np.ndarray:
    """Index pairs (i, j), i < j, whose phash Hamming distance is <= radius: (P, 2) int64, sorted.

    With `variants` (the `phash_dihedral` column), also the pairs where a flip or quarter turn of one
    image is within `radius` of the other. Distances for the pairs: `pair_distances`.
    """
    _check_radius(radius)
    hashes = phash_to_uint64(phashes)
    n = len(hashes)
    if variants is not None and len(variants) != n:
        raise ValueError(f"variants has {len(variants)} rows but phashes has {n}; pass one per image")
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    found = [_pairs_sharing_band(hashes, shift, mask, radius) for shift, mask in _band_masks(radius)]
    if variants is not None:
        found.append(_variant_pairs(hashes, variants_to_uint64(variants, hashes), radius))
    pairs = np.concatenate(found)
    # a pair may agree on several bands: keep each once, in (i, j) order
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1).astype(np.int64)


def pair_distances(
    phashes: Sequence[str], pairs: np.ndarray, variants: Sequence[str] | None = None
) -> np.ndarray:
    """Hamming distances (P,) for index pairs (P, 2) into `phashes`; with `variants`, the smallest
    distance between one image and any flip/rotation of the other (0 for an exact mirror image)."""
    hashes = phash_to_uint64(phashes)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    dist = hamming_distance(hashes[a], hashes[b])
    if variants is not None and len(pairs):
        var = variants_to_uint64(variants, hashes)  # (n, 7)
        dist = np.minimum(dist, hamming_distance(var[a], hashes[b][:, None]).min(axis=1))
        dist = np.minimum(dist, hamming_distance(var[b], hashes[a][:, None]).min(axis=1))
    return dist


def pair_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected component (n,) int of each of n items linked by index pairs (P, 2); arbitrary numbers."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1]


def key_text(value: object) -> str | None:
    """A group key as compared: its text without surrounding spaces; None for a missing one (None, NaN,
    empty or blank)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value).strip() or None


def same_key_pairs(keys: Sequence[object] | None) -> np.ndarray:
    """Index pairs (P, 2) linking the rows that share a key (each to the first row holding it); rows whose
    key is missing (None, NaN, empty or blank text) link to nothing."""
    if keys is None:
        return np.empty((0, 2), dtype=np.int64)
    first: dict[str, int] = {}
    pairs = []
    for row, key in enumerate(keys):
        text = key_text(key)
        if text is None:
            continue
        if text in first:
            pairs.append((first[text], row))
        else:
            first[text] = row
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def near_duplicate_groups(
    phashes: Sequence[str],
    radius: int = 6,
    ids: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    keys: Sequence[object] | None = None,
) -> np.ndarray:
    """Group label per image: connected components of "phash Hamming distance <= radius", and of "the
    same `keys` value" (frames of one video, photos of one drive: what no hash can tell belong together).

    Without `ids`: int64 labels (n,), numbered 0, 1, ... in order of each group's first row.
    With `ids` (e.g. image_id): object array (n,) holding the smallest id in each image's group,
    a label that depends only on the group's content, not on row order. `variants`: see
    `near_duplicate_pairs`; `keys`: see `same_key_pairs`.
    """
    n = len(phashes)
    if ids is not None and len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but phashes has {n}; pass one id per phash")
    if keys is not None and len(keys) != n:
        raise ValueError(f"keys has {len(keys)} entries but phashes has {n}; pass one key per phash")
    pairs = np.concatenate([near_duplicate_pairs(phashes, radius, variants), same_key_pairs(keys)])
    labels = pair_components(n, pairs)
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
