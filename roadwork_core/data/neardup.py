"""Near-duplicate groups from perceptual hashes, without an O(n^2) Python loop.

Two images are near-duplicates when the Hamming distance between their 64-bit perceptual hashes
(`imagehash.phash`, stored as 16 hex characters) is at most `radius`. Groups are the connected
components of that graph, so a chain a~b~c lands in one group even if a and c are far apart.

Flips and quarter turns: a mirrored copy, or a photo whose EXIF orientation tag was changed (the
image is decoded upright, so the tag turns into a rotation), has a phash ~32 bits from its original.
`dihedral_phashes` also hashes the 7 other flips/rotations of an image (column `phash_dihedral`);
given them, two images are near-duplicates when any flip/rotation of one is within `radius` of the
other.

Added borders: a copy letterboxed, padded to a square or framed in black, white or grey has a phash 8-18
bits from its original (a 2 % black frame already 8). `content_box` finds such a frame (uniform neutral
lines along an edge) and the phash of the image inside it is the last entry of `phash_dihedral`; two images
are also near-duplicates when the content hash of one is within `radius` of the phash or content hash of
the other, a flip or quarter turn of one included (a mirrored copy in a frame).

Crops of 5 % and 10 % from one side: 8 more hashes of each image cropped so, compared at 1 bit
(`CROP_RADIUS`) with the other image's phash, flips, quarter turns and content hash (a mirrored crop).
The centre square (a copy centre-cropped and resized to 224 x 224, as the validator and most models take an
image): one more hash, compared at 1 bit with the other image's phash only (against its flips too it paired
two distinct night scenes of the demo drop).
Larger crops, small rotations, coloured frames and overlays stay out of a perceptual hash's reach
(see README, "Splits and the split contract").

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
N_FLIPS = 7  # the flips and rotations of the dihedral group other than the identity
N_VARIANTS = N_FLIPS + 1  # ... and the phash of the content inside an added border (`content_box`)
CROP_FRACTIONS = (0.05, 0.10)  # crop variants: this share of the width / height cut from one side
N_CROPS = 4 * len(CROP_FRACTIONS)  # left, top, right, bottom for each fraction
CENTRE = N_VARIANTS + N_CROPS  # the centre square crop (the validator's and most models' input shape)
N_ALL = CENTRE + 1  # the entries of a `phash_dihedral` string (tables written before the centre crop: 16)
# Crop variants are compared at 1 bit, not `radius`: 5 % and 10 % crops of 40 demo scenes (JPEG q90) were
# within 1 bit of one of their original's crop variants 35 / 40 and 29 / 40 times (at 2 bits 40 and 39),
# and on the 2,000-image demo drop they add no pair at 1 bit, 1 at 2, 55 at 4, 409 at 6. The one pair at 2
# bits regrouped the demo's splits and moved its val_test MCC from 0.396 to 0.33 (the tiny model's
# training is that sensitive to which images it sees), so 1 bit keeps every split as it was.
CROP_RADIUS = 1
_CROP_BASE = 128  # crop variants are cut from a copy reduced to about this shorter side (box filter)
_PHASH_SIDE = 32  # imagehash.phash reduces the image to 32 x 32 grey (hash_size 8 x highfreq_factor 4)
# content_box: an edge line is border when >= 98 % of its pixels lie within 10 levels (per channel) of the
# line's median colour, and that colour is neutral (channels within 12 levels: black, white, grey). Lines
# are read on a copy reduced to about 256 px, whose box filter averages JPEG ringing away. Neutral only:
# on the 2,000-image synthetic drop, trimming flat lines of any colour cut the (blue) sky off 1,330
# scenes and doubled the pairs of distinct scenes within 6 bits (34 -> 76); the neutral rule trims none.
_BORDER_TOLERANCE = 10
_BORDER_SHARE = 0.9
_BORDER_RINGING = 40
_BORDER_NEUTRAL = 12
_BORDER_SIDE = 256
_MIN_CONTENT = 0.4  # a frame leaving less than 40 % of a side is taken for content (a plain image)
_MAX_CANDIDATES = 4_000_000  # candidate pairs compared at once by the variant search (memory bound)


def content_box(img) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of a decoded PIL image inside an added neutral border (a letterbox, the
    padding to a square, a black / white / grey frame, on any of the four sides), or None without one.
    A border leaving less than 40 % of the width or height is not trimmed (a plain or almost plain image)."""
    w, h = img.size
    factor = max(1, max(w, h) // _BORDER_SIDE)
    if min(w, h) < 8 * factor:  # a sliver: too thin to tell a frame from content
        return None
    rgb = img if img.mode == "RGB" else img.convert("RGB")

    def colour_of(line: np.ndarray) -> np.ndarray | None:  # (length, 3) -> its neutral colour, or None
        colour = np.median(line, axis=0)  # (3,)
        return None if colour.max() - colour.min() > _BORDER_NEUTRAL else colour

    def near(block: np.ndarray, colour: np.ndarray) -> np.ndarray:  # (k, length, 3) -> (k,) lines of border
        dev = np.abs(block.astype(np.int16) - colour).max(axis=2)  # (k, length)
        return ((dev <= _BORDER_TOLERANCE).mean(axis=1) >= _BORDER_SHARE) & (
            dev.max(axis=1) <= _BORDER_RINGING
        )

    def border_line(line: np.ndarray) -> bool:  # (length, 3)
        colour = colour_of(line)
        return colour is not None and bool(near(line[None], colour)[0])

    def reduced(box: tuple[int, int, int, int]) -> np.ndarray:
        part = rgb.crop(box)
        return np.asarray(part.reduce(factor) if factor > 1 else part)

    # most photos stop here: none of their four outer lines (each `factor` pixels deep) is a neutral border
    edges = (
        reduced((0, 0, w, factor))[0],
        reduced((0, h - factor, w, h))[-1],
        reduced((0, 0, factor, h))[:, 0],
        reduced((w - factor, 0, w, h))[:, -1],
    )
    if not any(border_line(edge) for edge in edges):
        return None
    pixels = reduced((0, 0, w, h))  # (h', w', 3) uint8
    sh, sw = pixels.shape[:2]

    def border_lines(lines: np.ndarray) -> int:  # (k, length, 3), from the edge inwards
        if not border_line(lines[0]):
            return 0
        inner = near(lines, colour_of(lines[0]))
        return len(inner) if inner.all() else int(np.argmin(inner))

    top = border_lines(pixels[: sh // 2])
    bottom = border_lines(pixels[::-1][: sh // 2])
    columns = pixels.transpose(1, 0, 2)
    left = border_lines(columns[: sw // 2])
    right = border_lines(columns[::-1][: sw // 2])
    if not (top or bottom or left or right):
        return None
    if sh - top - bottom < _MIN_CONTENT * sh or sw - left - right < _MIN_CONTENT * sw:
        return None
    return (round(left * w / sw), round(top * h / sh), w - round(right * w / sw), h - round(bottom * h / sh))


def _inside_frames(img, depth: int = 3):
    """The image inside its neutral frames, nested ones too (a screenshot: a grey title bar, then the white
    page around the photo), up to `depth` trims; `img` itself when it has none."""
    for _ in range(depth):
        box = content_box(img)
        if box is None:
            break
        img = img.crop(box)
    return img


def _phash32(img):
    import imagehash
    from PIL import Image

    small = img.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    return small, str(imagehash.phash(small))  # equal to imagehash.phash(img): it does the same reduction


def dihedral_phashes(img) -> tuple[str, str]:
    """(phash, phash_dihedral) of a decoded PIL image.

    phash is `str(imagehash.phash(img))`. phash_dihedral holds the phashes of the image flipped left-right,
    flipped top-bottom, rotated 90 / 180 / 270 degrees, transposed and transversed, then the phash of its
    content inside an added border (`content_box`; the phash itself when it has none), space-separated.
    The 7 flips are taken from the 32 x 32 grey image phash itself reduces to, so they cost 7 small DCTs,
    not 7 more resizes; flipping and resizing commute, so each matches the phash of the flipped full-size
    image to within a bit or two.
    """
    import imagehash
    from PIL import Image

    small, phash = _phash32(img)
    ops = (
        Image.Transpose.FLIP_LEFT_RIGHT,
        Image.Transpose.FLIP_TOP_BOTTOM,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    )
    inner = _inside_frames(img)
    content = _phash32(inner)[1] if inner is not img else phash
    flips = [str(imagehash.phash(small.transpose(op))) for op in ops]
    return phash, " ".join([*flips, content, *_crop_phashes(inner), _centre_phash(inner)])


def _reduced_grey(img, side: int = _CROP_BASE):
    grey = img.convert("L")
    factor = max(1, min(grey.size) // side)
    return grey.reduce(factor) if factor > 1 else grey


def _centre_phash(img) -> str:
    """phash of the centre square of `img` (all of it when it is square), from a grey copy reduced to a
    shorter side of about 256 px: from the crop variants' ~128 px copy, 4 of 20 centre-square copies resized
    to 224 px were 2 bits away, from 256 px 2 of 20."""
    base = _reduced_grey(img, 2 * _CROP_BASE)
    w, h = base.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return _phash32(base.crop((left, top, left + side, top + side)))[1]


def _crop_phashes(img) -> list[str]:
    """phashes of `img` with 5 % and 10 % cut from its left, top, right and bottom side, from a grey copy
    reduced to a ~128 px shorter side (as close to the phash of the cropped full-size image as cutting the
    full-size image: 40 / 40 5 % crops within 2 bits either way, at a quarter of the cost)."""
    base = _reduced_grey(img)
    w, h = base.size
    out = []
    for fraction in CROP_FRACTIONS:
        dw, dh = int(fraction * w), int(fraction * h)
        for box in ((dw, 0, w, h), (0, dh, w, h), (0, 0, w - dw, h), (0, 0, w, h - dh)):
            out.append(_phash32(base.crop(box))[1])
    return out


def variants_to_uint64(variants: Sequence[str | None], hashes: np.ndarray) -> np.ndarray:
    """Parse `phash_dihedral` strings (17 space-separated hex hashes each: 7 flips, the content hash, 8 crop
    variants, the centre square) into a (n, 17) uint64 array.

    A missing entry (None, NaN, ""; a row from a table written before the column existed) stands for
    the upright hash `hashes[row]` everywhere: that image is compared upright only. Rows written before
    the content hash (7), the crop variants (8) or the centre square (16) take the upright hash for what
    they lack."""
    out = np.empty((len(variants), N_ALL), dtype=np.uint64)
    for row, text in enumerate(variants):
        out[row] = hashes[row]
        if text is None or text == "" or (isinstance(text, float) and np.isnan(text)):
            continue
        parts = text.split() if isinstance(text, str) else []
        if len(parts) not in (N_FLIPS, N_VARIANTS, CENTRE, N_ALL):
            raise ValueError(
                f"phash_dihedral at row {row} is {text!r}; expected {N_ALL} space-separated "
                f"{HEX_CHARS}-character hex hashes (dihedral_phashes); recompute the image table"
            )
        out[row, : len(parts)] = phash_to_uint64(parts)
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
    """Pairs (i, j), i < j, where some flip/rotation of one image, or its content inside a border, is
    within `radius` of the other.

    Queries are the (n * 8) variant hashes, the index the n upright ones; per band, a query is compared
    with the index hashes in its bucket only (never variant with variant), in chunks of at most
    `_MAX_CANDIDATES` comparisons."""
    n, k = variants.shape
    queries = variants.reshape(-1)  # (kn,) row-major: query q belongs to image q // k
    owner = np.repeat(np.arange(n, dtype=np.int64), k)
    found: list[np.ndarray] = []
    for shift, mask in _band_masks(radius):
        band = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(band, kind="stable")
        band_sorted = band[order]
        qband = (queries >> np.uint64(shift)) & np.uint64(mask)
        left = np.searchsorted(band_sorted, qband, side="left")
        counts = np.searchsorted(band_sorted, qband, side="right") - left  # (kn,) bucket sizes
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
    image, or its content inside an added border, is within `radius` of the other image or of its
    content. Distances for the pairs: `pair_distances`.
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
        var = variants_to_uint64(variants, hashes)  # (n, 17)
        found.append(_variant_pairs(hashes, var[:, :N_VARIANTS], radius))
        crop_radius = min(radius, CROP_RADIUS)
        side_crops = var[:, N_VARIANTS:CENTRE]
        found.append(_variant_pairs(hashes, var[:, N_VARIANTS:], crop_radius))  # crops, the centre square too
        # a crop of one against a flip / quarter turn of the other, or its content inside a frame: a cropped
        # copy that was also mirrored, turned or framed (each alone is caught above; together they were not)
        found += [_variant_pairs(var[:, f], side_crops, crop_radius) for f in range(N_VARIANTS)]
        content = var[:, N_FLIPS]  # both images framed (or one framed the colour of the other's edge)
        found += [_pairs_sharing_band(content, shift, mask, radius) for shift, mask in _band_masks(radius)]
        found.append(_variant_pairs(content, var[:, :N_FLIPS], radius))  # a mirrored copy with a frame
    pairs = np.concatenate(found)
    # a pair may agree on several bands: keep each once, in (i, j) order
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1).astype(np.int64)


def pair_distances(
    phashes: Sequence[str], pairs: np.ndarray, variants: Sequence[str] | None = None
) -> np.ndarray:
    """Hamming distances (P,) for index pairs (P, 2) into `phashes`; with `variants`, the smallest
    distance between one image and any flip/rotation of the other (0 for an exact mirror image), or
    between the content inside their borders."""
    hashes = phash_to_uint64(phashes)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    dist = hamming_distance(hashes[a], hashes[b])
    if variants is not None and len(pairs):
        var = variants_to_uint64(variants, hashes)  # (n, 17)
        dist = np.minimum(dist, hamming_distance(var[a, :N_VARIANTS], hashes[b][:, None]).min(axis=1))
        dist = np.minimum(dist, hamming_distance(var[b, :N_VARIANTS], hashes[a][:, None]).min(axis=1))
        crops = np.minimum(
            hamming_distance(var[a, N_VARIANTS:], hashes[b][:, None]).min(axis=1),
            hamming_distance(var[b, N_VARIANTS:], hashes[a][:, None]).min(axis=1),
        )  # a crop variant counts only within CROP_RADIUS, against the other's upright hash ...
        for f in range(
            N_VARIANTS
        ):  # ... or a side crop against one of its flips / its content inside a frame
            crops = np.minimum(
                crops, hamming_distance(var[a, N_VARIANTS:CENTRE], var[b, f][:, None]).min(axis=1)
            )
            crops = np.minimum(
                crops, hamming_distance(var[b, N_VARIANTS:CENTRE], var[a, f][:, None]).min(axis=1)
            )
        dist = np.minimum(dist, np.where(crops <= CROP_RADIUS, crops, HASH_BITS))
        dist = np.minimum(dist, hamming_distance(var[a, N_FLIPS], var[b, N_FLIPS]))
        dist = np.minimum(dist, hamming_distance(var[a, :N_FLIPS], var[b, N_FLIPS][:, None]).min(axis=1))
        dist = np.minimum(dist, hamming_distance(var[b, :N_FLIPS], var[a, N_FLIPS][:, None]).min(axis=1))
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
