"""Leakage and balance checks on a splits table, as pure functions (the Dagster asset checks wrap them).

Each check returns a `CheckOutcome`: passed, a message a person can act on, and small
JSON-serialisable metadata. A splits table has at least `image_id`, `split`, `label`; `phash` is
needed for the near-duplicate check; `file` / `uri` are used to name images when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from roadwork_core.data.neardup import (
    key_text,
    near_duplicate_pairs,
    pair_distances,
    same_key_pairs,
    table_hashes,
)
from roadwork_core.data.splits import GROUP_COLUMN, SPLIT_ORDER

MAX_LISTED = 20  # rows listed in a message / metadata; the rest are counted
# checks on `splits` that warn (non-blocking, severity WARN) instead of stopping the run
WARNING_CHECKS = frozenset({"check_near_duplicate_labels_agree"})
CLASS_NAMES = {0: "no_roadwork", 1: "roadwork"}


@dataclass
class CheckOutcome:
    passed: bool
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _require(splits: pd.DataFrame, columns: list[str], check: str) -> None:
    missing = [c for c in columns if c not in splits.columns]
    if missing:
        raise ValueError(
            f"{check} needs columns {missing} in the splits table (present: {list(splits.columns)})"
        )


def image_label(row: pd.Series) -> str:
    """The path of an image for messages: `<drop>/<file>` (the drop folder is the row's `source`: every
    drop of a synthetic or exported series reuses names like images/000004.jpg, so the file alone may
    name another version's image), else `file`, else `uri`, else `image_id`, else '?'."""
    file, source = row.get("file"), row.get("source")
    if isinstance(file, str) and file:
        return f"{source}/{file}" if isinstance(source, str) and source else file
    for col in ("uri", "image_id"):
        value = row.get(col)
        if isinstance(value, str) and value:
            return value
    return "?"


def _split_names(splits: pd.DataFrame) -> list[str]:
    present = set(splits["split"].astype(str))
    known = [s.value for s in SPLIT_ORDER]
    return known + sorted(present - set(known))


def check_no_shared_images(splits: pd.DataFrame) -> CheckOutcome:
    """Every image_id appears on exactly one row. A repeated image_id is the same bytes under two
    names: in two splits it is leakage; in one split it still double-counts an image."""
    _require(splits, ["image_id", "split"], "check_no_shared_images")
    dup = splits[splits["image_id"].duplicated(keep=False)].sort_values("image_id", kind="mergesort")
    n_dup_ids = int(dup["image_id"].nunique())
    if n_dup_ids == 0:
        return CheckOutcome(True, f"all {len(splits)} image_ids are unique", {"n_images": len(splits)})
    listed, cross = [], 0
    for image_id, rows in dup.groupby("image_id", sort=True):
        n_splits = rows["split"].nunique()
        cross += int(n_splits > 1)
        if len(listed) < MAX_LISTED:
            listed.append(
                {
                    "image_id": str(image_id),
                    "files": [image_label(r) for _, r in rows.iterrows()],
                    "splits": [str(s) for s in rows["split"]],
                }
            )
    lines = [
        f"  {d['image_id'][:16]}…: " + ", ".join(f"{f} [{s}]" for f, s in zip(d["files"], d["splits"]))
        for d in listed
    ]
    more = f"\n  … and {n_dup_ids - len(listed)} more" if n_dup_ids > len(listed) else ""
    message = (
        f"{n_dup_ids} image_ids appear on more than one row ({cross} of them in two or more splits): the same "
        f"bytes under different names. Remove the copies from the drop (or dedupe the image table by image_id) "
        f"and rebuild the splits:\n" + "\n".join(lines) + more
    )
    meta = {
        "n_images": len(splits),
        "n_duplicated_ids": n_dup_ids,
        "n_cross_split": cross,
        "examples": listed,
    }
    return CheckOutcome(False, message, meta)


def _with_vanished(splits: pd.DataFrame, previous: pd.DataFrame | None) -> tuple[pd.DataFrame, int]:
    """The splits table plus the previous version's images that are no longer in it (marked
    `_vanished`), so a new copy of a vanished evaluation image is still compared with it. `_new` marks
    the table's images that `previous` does not hold."""
    table = splits.reset_index(drop=True).assign(_vanished=False, _new=True)
    if previous is None or len(previous) == 0:
        return table, 0
    table["_new"] = ~table["image_id"].isin(previous["image_id"])
    if "phash" not in previous.columns:
        return table, 0
    gone = previous[~previous["image_id"].isin(table["image_id"])].drop_duplicates("image_id")
    cols = [c for c in table.columns if c in gone.columns and c not in ("_vanished", "_new")]
    gone = gone[cols + [c for c in ("last_version",) if c in gone.columns and c not in cols]]
    return pd.concat([table, gone.assign(_vanished=True, _new=False)], ignore_index=True), len(gone)


def _shared_key(a: pd.Series, b: pd.Series, column: str) -> str | None:
    """The `column` value two rows share (the reason they pair), else None."""
    ka = key_text(a.get(column))
    return ka if ka is not None and ka == key_text(b.get(column)) else None


def _gone(row: pd.Series) -> str:
    last = row.get("last_version")
    where = (
        f"last in {last}" if isinstance(last, str) and last and last != "(earlier)" else "a previous version"
    )
    return f" ({where}, no longer in the table)"


def check_no_near_duplicates_across_splits(
    splits: pd.DataFrame,
    radius: int = 6,
    previous: pd.DataFrame | None = None,
    group_column: str | None = GROUP_COLUMN,
) -> CheckOutcome:
    """No two images in different splits are near-duplicates: phashes within `radius` (Hamming
    distance), a flip or quarter turn included when the table has `phash_dihedral`; nor share a value of
    `group_column` (one video, one drive). With `previous` (the previous version's split history), its
    images that are no longer in `splits` take part too: a new image may not copy a vanished image of
    another split."""
    _require(splits, ["image_id", "split", "phash"], "check_no_near_duplicates_across_splits")
    table, n_vanished = _with_vanished(splits, previous)
    phashes, variants = table_hashes(table)
    keys = table[group_column].tolist() if group_column and group_column in table.columns else None
    key_pairs = same_key_pairs(keys)
    pairs = np.concatenate([near_duplicate_pairs(phashes, radius, variants), key_pairs])  # (P, 2)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0) if len(pairs) else pairs
    split_arr = table["split"].astype(str).to_numpy()
    vanished = table["_vanished"].to_numpy(dtype=bool)
    new = table["_new"].to_numpy(dtype=bool)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        # A pair with a vanished image counts only when the other image is new: a new copy of a vanished
        # image in another split is a leak; an image that was already there beside it, in its own split,
        # is no longer trained or scored with it (e.g. the user removed one image of a reported pair).
        cross = pairs[
            (split_arr[i] != split_arr[j])
            & ~(vanished[i] & vanished[j])
            & ~(vanished[i] & ~new[j])
            & ~(vanished[j] & ~new[i])
        ]
    else:
        cross = pairs
    meta: dict[str, Any] = {
        "radius": radius,
        "n_near_duplicate_pairs": int(len(pairs)),
        "flips_and_rotations": variants is not None,
        "n_vanished_previous_compared": n_vanished,
    }
    if len(cross) == 0:
        msg = f"no near-duplicate pair (phash distance <= {radius}) crosses splits ({len(pairs)} pairs within splits)"
        return CheckOutcome(True, msg, meta)
    dist = pair_distances(phashes, cross, variants)
    order = np.lexsort((cross[:, 1], cross[:, 0], dist))  # closest pairs first
    cross, dist = cross[order], dist[order]
    listed = []
    for (i, j), d in zip(cross[:MAX_LISTED].tolist(), dist[:MAX_LISTED].tolist()):
        a, b = table.iloc[i], table.iloc[j]
        listed.append(
            {
                "a": image_label(a) + (_gone(a) if vanished[i] else ""),
                "a_split": str(a["split"]),
                "b": image_label(b) + (_gone(b) if vanished[j] else ""),
                "b_split": str(b["split"]),
                "distance": int(d),
                "group": _shared_key(a, b, group_column) if keys is not None else None,
            }
        )
    lines = [
        f"  {d['a']} [{d['a_split']}] ~ {d['b']} [{d['b_split']}] "
        + (
            f"same {group_column} {d['group']!r}"
            if d.get("group") is not None
            else f"distance {d['distance']}"
        )
        for d in listed
    ]
    more = f"\n  … and {len(cross) - len(listed)} more" if len(cross) > len(listed) else ""
    grouped = f" or the same {group_column}" if keys is not None else ""
    message = (
        f"{len(cross)} near-duplicate pairs (phash distance <= {radius}, flips and rotations included{grouped}) sit "
        f"in different splits. Remove one image of each pair from the drop, or rebuild the splits so each group is "
        f"one unit (assign_splits does this unless a previous version already split the pair):\n"
        + "\n".join(lines)
        + more
    )
    meta.update({"n_cross_split_pairs": int(len(cross)), "examples": listed})
    return CheckOutcome(False, message, meta)


def check_near_duplicate_labels_agree(splits: pd.DataFrame, radius: int = 3) -> CheckOutcome:
    """Near-identical pairs (the same photo resized, re-encoded, flipped, ...) carry the same label.

    Identical bytes with two labels are rejected by the image table; a near-copy with the other label
    is one of two things, a labelling mistake or a change too small for the hash to see (a cone added
    to the same street), and a person has to look. Direct pairs only (not whole chains, whose ends may
    differ), within `radius`, by default half the grouping radius: re-encoded, resized and flipped
    copies sit at 0-4 bits, while unrelated low-detail scenes reach 6. Meant as a warning."""
    _require(splits, ["image_id", "label", "phash"], "check_near_duplicate_labels_agree")
    table = splits.reset_index(drop=True)
    phashes, variants = table_hashes(table)
    pairs = near_duplicate_pairs(phashes, radius, variants)
    labels = table["label"].to_numpy()
    mixed = pairs[labels[pairs[:, 0]] != labels[pairs[:, 1]]] if len(pairs) else pairs
    meta: dict[str, Any] = {"radius": radius, "n_near_duplicate_pairs": int(len(pairs))}
    if len(mixed) == 0:
        return CheckOutcome(True, f"all {len(pairs)} near-duplicate pairs agree on the label", meta)
    dist = pair_distances(phashes, mixed, variants)
    listed = []
    for (i, j), d in zip(mixed[:MAX_LISTED].tolist(), dist[:MAX_LISTED].tolist()):
        a, b = table.iloc[i], table.iloc[j]
        listed.append(
            {"a": image_label(a), "a_label": CLASS_NAMES.get(int(a["label"]), str(a["label"])),
             "b": image_label(b), "b_label": CLASS_NAMES.get(int(b["label"]), str(b["label"])), "distance": int(d)}
        )  # fmt: skip
    lines = [
        f"  {d['a']} ({d['a_label']}) ~ {d['b']} ({d['b_label']}) distance {d['distance']}" for d in listed
    ]
    more = f"\n  … and {len(mixed) - len(listed)} more" if len(mixed) > len(listed) else ""
    message = (
        f"{len(mixed)} near-duplicate pairs carry different labels: the same photo labelled both ways, or a "
        f"change the perceptual hash cannot see. Look at each pair; fix the wrong label in its drop, or "
        f"remove one image:\n" + "\n".join(lines) + more
    )
    meta.update({"n_label_conflicts": int(len(mixed)), "examples": listed})
    return CheckOutcome(False, message, meta)


def check_label_balance(splits: pd.DataFrame, tolerance: float = 0.05) -> CheckOutcome:
    """Each split's positive rate is within `tolerance` (absolute) of the overall positive rate."""
    _require(splits, ["split", "label"], "check_label_balance")
    overall = float((splits["label"] == 1).mean()) if len(splits) else 0.0
    rates: dict[str, float | None] = {}
    bad: list[str] = []
    for name in _split_names(splits):
        rows = splits[splits["split"] == name]
        if len(rows) == 0:
            rates[name] = None
            bad.append(f"split '{name}' is empty (overall positive rate {overall:.3f})")
            continue
        rate = float((rows["label"] == 1).mean())
        rates[name] = round(rate, 4)
        if abs(rate - overall) > tolerance:
            bad.append(
                f"split '{name}' has positive rate {rate:.3f} ({int((rows['label'] == 1).sum())}/{len(rows)}), "
                f"overall is {overall:.3f}, off by {abs(rate - overall):.3f} > tolerance {tolerance}"
            )
    meta = {"overall_positive_rate": round(overall, 4), "positive_rate": rates, "tolerance": tolerance}
    if not bad:
        return CheckOutcome(True, f"every split's positive rate is within {tolerance} of {overall:.3f}", meta)
    message = (
        "label balance off:\n  "
        + "\n  ".join(bad)
        + "\nSplits are sticky (an image keeps its split in every later version), so they are not rebuilt: "
        "add images of the under-represented class in a new drop (new images are assigned stratified), or, when "
        "labels were changed (a relabelled drop, box_classes), raise split_settings.balance_tolerance for this "
        "version. Large near-duplicate groups also skew small splits."
    )
    return CheckOutcome(False, message, meta)


def check_min_per_class(splits: pd.DataFrame, min_count: int = 10) -> CheckOutcome:
    """Each class (0 no_roadwork, 1 roadwork) has at least `min_count` images in every split."""
    _require(splits, ["split", "label"], "check_min_per_class")
    n_total = len(splits)
    counts: dict[str, dict[str, int]] = {}
    short: list[str] = []
    shortfall: list[dict[str, Any]] = []
    for name in _split_names(splits):
        rows = splits[splits["split"] == name]
        share = len(rows) / n_total if n_total else 0.0
        counts[name] = {}
        for label, cls in CLASS_NAMES.items():
            have = int((rows["label"] == label).sum())
            counts[name][cls] = have
            if have >= min_count:
                continue
            need = min_count - have
            overall = (
                f"roughly {int(np.ceil(need / share))} more {cls} images overall, since '{name}' gets {share:.0%} of images"
                if share > 0
                else f"'{name}' is empty; check the split ratios"
            )
            short.append(
                f"split '{name}' has {have} {cls} (label {label}) images, needs {need} more ({overall})"
            )
            shortfall.append({"split": name, "class": cls, "have": have, "need_more": need})
    meta = {"min_count": min_count, "counts": counts, "shortfall": shortfall}
    if not short:
        return CheckOutcome(True, f"every split has at least {min_count} images of each class", meta)
    message = f"too few images per class (minimum {min_count}):\n  " + "\n  ".join(short)
    message += "\nAdd labelled images of those classes in a new drop, or lower min_count for a demo."
    return CheckOutcome(False, message, meta)


def check_sticky(splits: pd.DataFrame, previous: pd.DataFrame | None) -> CheckOutcome:
    """No image that was in the previous version's splits table changed split."""
    _require(splits, ["image_id", "split"], "check_sticky")
    if previous is None or len(previous) == 0:
        return CheckOutcome(True, "no previous partition to compare with", {"n_previous": 0, "n_moved": 0})
    _require(previous, ["image_id", "split"], "check_sticky (previous table)")
    cols = ["image_id", "split"] + [c for c in ("file", "uri") if c in splits.columns]
    joined = splits[cols].merge(
        previous[["image_id", "split"]].drop_duplicates(), on="image_id", suffixes=("", "_previous")
    )
    moved = joined[joined["split"].astype(str) != joined["split_previous"].astype(str)]
    moved = moved.sort_values("image_id", kind="mergesort")
    n_dropped = int((~previous["image_id"].isin(splits["image_id"])).sum())
    meta: dict[str, Any] = {
        "n_previous": int(len(previous)),
        "n_moved": int(len(moved)),
        "n_dropped": n_dropped,
    }
    if len(moved) == 0:
        msg = f"all {len(joined)} images from the previous partition kept their split"
        if n_dropped:
            msg += f" ({n_dropped} previous images are no longer in the image table)"
        return CheckOutcome(True, msg, meta)
    listed = [
        {
            "image_id": str(r["image_id"]),
            "file": image_label(r),
            "from": str(r["split_previous"]),
            "to": str(r["split"]),
        }
        for _, r in moved.head(MAX_LISTED).iterrows()
    ]
    lines = [f"  {d['image_id'][:16]}… {d['file']}: {d['from']} -> {d['to']}" for d in listed]
    more = f"\n  … and {len(moved) - len(listed)} more" if len(moved) > len(listed) else ""
    message = (
        f"{len(moved)} images changed split since the previous partition, which leaks evaluation images "
        f"into training (or back). Rebuild with assign_splits(images, cfg, previous=<previous splits>):\n"
        + "\n".join(lines)
        + more
    )
    meta["moved"] = listed
    return CheckOutcome(False, message, meta)
