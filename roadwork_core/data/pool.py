"""The unlabelled pool that ExPLoRA trains on, filtered against the evaluation splits.

The pool (each drop's `unlabelled/` folder) never passes through `splits`, so nothing else stops a
near-copy of a val_select / val_calib / val_test image from entering self-supervised training. Each
pool image is hashed the way the image table hashes (`dihedral_phashes` of the decoded image) and dropped
when it is a near-duplicate of any image of those splits (within `radius` bits, flips and quarter turns
included, directly or through a chain of pool images); unreadable pool images are dropped too. Every drop is listed with the evaluation image it copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from roadwork_core.data.images import ImageRejected, load_image, printable_name, utf8_name
from roadwork_core.data.neardup import dihedral_phashes, near_duplicate_pairs, pair_components, pair_distances
from roadwork_core.data.parallel import parallel_map
from roadwork_core.data.split_checks import image_label

DROPPED_COLUMNS: list[str] = ["uri", "reason", "detail", "image_id", "split", "distance"]


@dataclass
class PoolFilter:
    kept: list[str]  # pool URIs to train on, in input order
    dropped: pd.DataFrame  # DROPPED_COLUMNS, one row per dropped pool image


def _pool_phash(uri: str) -> tuple[tuple[str, str] | None, str]:
    try:
        return dihedral_phashes(load_image(uri)), ""
    except ImageRejected as exc:
        return None, f"{exc.reason}: {exc.detail}"
    except (OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def filter_unlabelled_pool(
    uris: list[str], reference: pd.DataFrame, radius: int = 6, workers: int | None = None
) -> PoolFilter:
    """Drop pool images that are near-duplicates of a `reference` row, directly or through a chain.

    reference: `image_id, split, phash` (+ `phash_dihedral`, `file`) of the splits the pool must not copy.
    Near-duplicates are the splits' own: phash within `radius`, flips and quarter turns included, and
    chains (a pool image within `radius` of another pool image that copies an evaluation image is dropped
    too, as `splits` would have put the whole chain in one split). The images are decoded and hashed by
    `parallel_map` (threads, or one process per core for a large pool); the result does not depend on `workers`.
    """
    missing = [c for c in ("image_id", "split", "phash") if c not in reference.columns]
    if missing:
        raise ValueError(f"reference table misses columns {missing}; pass SplitReader.read_phashes rows")
    rows: list[dict] = []
    hashed: list[tuple[int, tuple[str, str]]] = []  # (index into uris, (phash, phash_dihedral))
    hashes = parallel_map(_pool_phash, uris, workers=workers)
    for i, (uri, (h, why)) in enumerate(zip(uris, hashes, strict=True)):
        if not utf8_name(uri):  # usable as a path, but no table can record it
            rows.append(
                {"uri": uri, "reason": "bad_filename", "detail": "the file name is not UTF-8; rename it"}
            )
        elif h is None:
            rows.append({"uri": uri, "reason": "unreadable", "detail": why})
        else:
            hashed.append((i, h))
    ref = reference.reset_index(drop=True)
    n_pool = len(hashed)
    ref_variants = ref["phash_dihedral"].tolist() if "phash_dihedral" in ref.columns else [None] * len(ref)
    phashes = [h[0] for _, h in hashed] + ref["phash"].tolist()
    variants = [h[1] for _, h in hashed] + ref_variants
    pairs = near_duplicate_pairs(phashes, radius, variants)  # (P, 2), i < j
    component = pair_components(len(phashes), pairs)  # (n_pool + R,)
    tainted = set(component[n_pool:].tolist())  # components holding an evaluation image
    for p in range(n_pool):
        if component[p] not in tainted:
            continue
        refs = n_pool + np.flatnonzero(component[n_pool:] == component[p])  # (k,) its evaluation images
        dist = pair_distances(phashes, np.stack([np.full(len(refs), p), refs], axis=1), variants)
        best = int(np.lexsort((refs, dist))[0])  # the nearest, ties by row
        r, d = int(refs[best]), int(dist[best])
        hit = ref.iloc[r - n_pool]
        where = image_label(hit)  # <drop>/<file>: drops of a series reuse file names
        how = (
            f"phash within {d} bits of {where} in {hit['split']} (flips and rotations included)"
            if d <= radius
            else f"linked to {where} in {hit['split']} ({d} bits) by a chain of near-duplicate pool images"
        )
        rows.append(
            {
                "uri": uris[hashed[p][0]],
                "reason": "near_duplicate_of_eval",
                "detail": f"{how}; left out of ExPLoRA",
                "image_id": hit["image_id"],
                "split": hit["split"],
                "distance": d,
            }
        )
    dropped = pd.DataFrame(rows, columns=DROPPED_COLUMNS)
    gone = set(dropped["uri"])
    dropped["uri"] = dropped["uri"].astype(str).map(printable_name)
    return PoolFilter(kept=[u for u in uris if u not in gone], dropped=dropped)


def cap_explora_images(train: list[str], pool: list[str], max_images: int | None) -> tuple[list[str], int]:
    """The images of one ExPLoRA epoch: the train split's, then the pool's, cut to the first `max_images`
    (none cut when it is None). Returns (uris, how many of them come from the pool).

    Train first: those are the images the classifier then trains on, and the cap is a time budget. A cap
    below the train split's size leaves the pool out entirely; the asset warns and records
    `unlabelled_used` so that this is visible. (A seeded sample of both was tried: on the demo it moved
    the exported weights by ~5e-6, and the random-init classifier trained from them ended at val_test MCC
    0.248 instead of 0.361, chaos rather than a better or worse choice; it is not the default here.)"""
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images = {max_images!r}; pass a positive cap, or null for no cap")
    uris = [*train, *pool]
    if max_images is None or len(uris) <= max_images:
        return uris, len(pool)
    return uris[:max_images], max(0, max_images - len(train))
