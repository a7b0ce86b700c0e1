"""Deterministic, content-addressed, sticky split assignment.

Each image goes to train / val_select / val_calib / val_test as a function of content only:

1. Near-duplicate groups (phash within `radius`, see `neardup.py`), joined by a shared value of
   `group_column` (a drop's `group_id` column: frames of one video, photos of one drive), are the unit of
   assignment; a group's id is its smallest image_id, so it does not depend on row order.
2. Sticky: an image listed in `previous` keeps its split; the other members of its group follow the
   group's previous split (the split most of its previous images hold, ties by smallest image_id).
3. Every other group is a "free" group. Within each label stratum (a group's majority label), free
   groups are ordered by sha256(salt + group_id) and each goes to the split that is furthest below
   its target (count / (ratio * stratum size), smallest first). On a fresh table this hits the
   ratios per label to within one group; on a new version it fills the splits that fell behind.
4. Quarantine: a new image can join near-duplicate groups whose previous images sit in different
   splits (a in train and b in val_select 12 bits apart, x within 6 bits of both). Wherever x went,
   it would be a near-duplicate of an image in another split, and stickiness forbids moving a or b,
   so every later version would fail the near-duplicate check. Such new images (every new image of
   a group whose previous images span splits) are left out of the splits table and listed in
   `df.attrs["quarantined"]` (records) with the pair they bridge; the groups are then recomputed without them.
5. Vanished images anchor their groups: a previous image that is no longer in the image table (deleted
   from its drop, or now rejected) still takes part in the near-duplicate groups with its previous split,
   so a new copy of it cannot land in another split; it is not in the output. `split_history` carries
   every image a version ever assigned, vanished ones included, into the next version's `previous`, so an
   anchor lasts for every later version, not only the next one.
6. Near-duplicates include flips and quarter turns when the table has `phash_dihedral` (neardup.py).

Nothing depends on the input row order or on the run; the output is sorted by image_id.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from roadwork_core.contracts import Split
from roadwork_core.data.neardup import key_text, near_duplicate_groups, pair_distances, table_hashes

log = logging.getLogger(__name__)

SPLIT_ORDER: tuple[Split, ...] = (Split.TRAIN, Split.VAL_SELECT, Split.VAL_CALIB, Split.VAL_TEST)
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "label", "phash")
LEADING_COLUMNS: list[str] = ["image_id", "split", "group_id", "label"]
QUARANTINE_COLUMNS: list[str] = ["image_id", "file", "reason", "detail", "bridges"]
QUARANTINE_REASON = "bridges_splits"
# What split_history keeps of each image ever assigned: enough to anchor its near-duplicate group and to name it.
HISTORY_COLUMNS: tuple[str, ...] = (
    "image_id", "split", "label", "phash", "phash_dihedral", "file", "source", "uri"
)  # fmt: skip


def _default_ratios() -> dict[str, float]:
    return {
        Split.TRAIN.value: 0.60,
        Split.VAL_SELECT.value: 0.10,
        Split.VAL_CALIB.value: 0.15,
        Split.VAL_TEST.value: 0.15,
    }


def validate_ratios(ratios: dict) -> dict[str, float]:
    """Return ratios keyed by split name; raise ValueError naming what is wrong."""
    valid = [s.value for s in SPLIT_ORDER]
    out: dict[str, float] = {}
    for key, value in ratios.items():
        name = key.value if isinstance(key, Split) else str(key)
        if name not in valid:
            raise ValueError(f"split ratio key '{name}' is not a split; use exactly {valid}")
        out[name] = float(value)
    missing = [s for s in valid if s not in out]
    if missing:
        raise ValueError(f"split ratios miss {missing}; give a ratio > 0 for each of {valid}")
    bad = {k: v for k, v in out.items() if not (v > 0)}
    if bad:
        raise ValueError(f"split ratios must all be > 0, got {bad}; every split needs images")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split ratios must sum to 1, they sum to {total:.6f}: {out}")
    return {s: out[s] for s in valid}


# The image table column whose equal values are one group (a labels.csv / parquet column `group_id`
# arrives as `meta.group_id`, see drops.RESERVED). Absent: nothing but near-duplicates groups images.
GROUP_COLUMN = "meta.group_id"


@dataclass
class SplitConfig:
    ratios: dict = field(default_factory=_default_ratios)
    radius: int = 6  # phash Hamming radius for near-duplicate groups
    salt: str = "roadwork-splits-v1"  # changing it reshuffles every free group
    # images sharing a value in this column (frames of one video, photos of one drive or scene) are one
    # group, like near-duplicates; empty cells group nothing; None or "" turns it off
    group_column: str | None = GROUP_COLUMN

    def __post_init__(self) -> None:
        self.ratios = validate_ratios(self.ratios)
        if not isinstance(self.radius, int) or not 0 <= self.radius < 64:
            raise ValueError(f"SplitConfig.radius must be an integer in [0, 63], got {self.radius!r}")


def content_key(salt: str, group_id: str) -> str:
    """The ordering key of a group: sha256 hex of salt + group_id."""
    return hashlib.sha256(f"{salt}\x00{group_id}".encode()).hexdigest()


def _validate_image_table(images: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(
            f"image table is missing columns {missing}; assign_splits needs {list(REQUIRED_COLUMNS)} "
            f"(columns present: {list(images.columns)})"
        )
    clash = [c for c in ("split", "group_id") if c in images.columns]
    if clash:
        raise ValueError(f"image table already has columns {clash}; pass the image table, not a splits table")
    bad_label = ~images["label"].isin([0, 1])
    if bad_label.any():
        row = int(np.flatnonzero(bad_label.to_numpy())[0])
        raise ValueError(
            f"image table row {row} (image_id {images['image_id'].iloc[row]}) has label "
            f"{images['label'].iloc[row]!r}; labels must be 0 (no roadwork) or 1 (roadwork)"
        )


def missing_group_column(images: pd.DataFrame, column: str | None) -> str | None:
    """A warning when `split_settings.group_column` names a column this version's image table lacks (a typo,
    or a column only later drops bring): grouping is off for this version. The default (a drop's group_id
    column) may be absent without a word."""
    if not column or column == GROUP_COLUMN or column in images.columns:
        return None
    from roadwork_core.data.image_table import IMAGE_TABLE_COLUMNS

    extra = [c for c in images.columns if c not in IMAGE_TABLE_COLUMNS]
    return (
        f"split_settings.group_column is {column!r}, but this version's image table has no such column, so its "
        f"images are not grouped by it (near-identical frames of one video could land in train and val_test). "
        f"Its metadata columns: {extra or 'none'} (a drop's csv columns keep their names; `group_id`, `split` and "
        "the other names the pipeline defines arrive as `meta.<name>`). Name one of them, or set group_column: ''"
    )


def _check_group_sizes(images: pd.DataFrame, cfg: SplitConfig) -> None:
    """Refuse a group column that makes one group of most of the table (an export's `group_id` that
    means something else, e.g. one shard id for every row): no ratio could hold."""
    column = cfg.group_column
    if not column or column not in images.columns or len(images) < 20:
        return
    keys = images[column].map(key_text).dropna()
    if keys.empty:
        return
    counts = keys.value_counts()
    if counts.iloc[0] > len(images) / 2:
        raise ValueError(
            f"{counts.iloc[0]} of {len(images)} images share {column} {counts.index[0]!r}, and one group goes to "
            f"one split, so the ratios {cfg.ratios} cannot hold. {column} should name small units (one video, one "
            f"drive); if the column means something else, turn grouping off (split_settings.group_column: '')"
        )


def _previous_splits(previous: pd.DataFrame | None) -> dict[str, str]:
    """image_id -> split of the previous version, validated."""
    if previous is None or len(previous) == 0:
        return {}
    missing = [c for c in ("image_id", "split") if c not in previous.columns]
    if missing:
        raise ValueError(
            f"previous splits table is missing columns {missing}; pass the previous 'splits' table"
        )
    valid = {s.value for s in SPLIT_ORDER}
    bad = previous.loc[~previous["split"].isin(valid)]
    if len(bad):
        raise ValueError(
            f"previous splits table has unknown split {bad['split'].iloc[0]!r} for image "
            f"{bad['image_id'].iloc[0]}; valid splits are {sorted(valid)}"
        )
    pairs = previous[["image_id", "split"]].drop_duplicates()
    dup = pairs["image_id"].duplicated(keep=False)
    if dup.any():
        ids = sorted(pairs.loc[dup, "image_id"].unique())[:10]
        raise ValueError(
            f"previous splits table puts images {ids} in more than one split; fix that version "
            f"(its check_no_shared_images should have failed) before building on it"
        )
    return dict(zip(pairs["image_id"], pairs["split"]))


def _sticky_group_splits(df: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """For groups holding previous images: the split their new members take (the most common
    previous split in the group, ties broken by the smallest image_id holding it), and the ids of
    groups whose previous images sit in more than one split. `df` must be sorted by image_id."""
    prev = df.loc[df["_prev"].notna(), ["group_id", "_prev"]]
    prev = prev.assign(
        row=np.flatnonzero(df["_prev"].notna())
    )  # df is sorted by image_id: row order = id order
    per = prev.groupby(["group_id", "_prev"], sort=False).agg(n=("row", "size"), first=("row", "min"))
    per = per.reset_index().sort_values(
        ["group_id", "n", "first"], ascending=[True, False, True], kind="mergesort"
    )
    chosen = per.drop_duplicates("group_id", keep="first")
    n_splits = per.groupby("group_id", sort=True)["_prev"].nunique()
    conflicts = [str(g) for g in n_splits.index[n_splits > 1]]
    return dict(zip(chosen["group_id"], chosen["_prev"])), conflicts


def _bridging_images(df: pd.DataFrame, conflicts: list[str]) -> pd.DataFrame:
    """New images in groups whose previous images span splits, each with the pair it bridges.

    The pair is the nearest previous image (phash Hamming distance) in each of two different splits.
    """
    rows = []
    from roadwork_core.data.split_checks import image_label

    for gid in conflicts:
        members = df[df["group_id"] == gid].reset_index(drop=True)
        phashes, variants = table_hashes(members)
        prev_rows = np.flatnonzero(members["_prev"].notna().to_numpy())  # (P,)
        prev = members.iloc[prev_rows]
        for xi in np.flatnonzero(members["_prev"].isna().to_numpy()).tolist():
            x = members.iloc[xi]
            pairs = np.stack([np.full(len(prev_rows), xi), prev_rows], axis=1)  # (P, 2)
            dist = pair_distances(phashes, pairs, variants)  # (P,) flips and rotations included
            nearest = (
                prev.assign(_d=dist)
                .sort_values(["_d", "image_id"], kind="mergesort")
                .drop_duplicates("_prev")
            )
            (_, a), (_, b) = list(nearest.head(2).iterrows())
            bridges = f"{a['image_id']} [{a['_prev']}] ~ {b['image_id']} [{b['_prev']}]"
            rows.append(
                {
                    "image_id": x["image_id"],
                    "file": image_label(x),  # <drop>/<file>: drops of a series reuse file names
                    "reason": QUARANTINE_REASON,
                    "detail": (
                        f"near-duplicate of {image_label(a)} in {a['_prev']} (distance {a['_d']}) and of {image_label(b)} "
                        f"in {b['_prev']} (distance {b['_d']}); both keep their split (sticky), so this image "
                        f"fits in neither and is left out. Remove it from the drop to silence this."
                    ),
                    "bridges": bridges,
                }
            )
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def _vanished_anchors(previous: pd.DataFrame | None, df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the previous splits table whose image is no longer in the image table (its file was
    deleted from a drop, or it is now rejected), as anchors: they take part in the near-duplicate
    groups, so a new copy of a vanished val_test image still follows it into val_test, and are left
    out of the result. Empty when the previous table has no phash."""
    if previous is None or len(previous) == 0 or "phash" not in previous.columns:
        return pd.DataFrame(columns=df.columns)
    gone = previous[~previous["image_id"].isin(df["image_id"])].drop_duplicates("image_id")
    keep = [c for c in df.columns if c in gone.columns and c not in ("_prev", "_anchor", "split", "group_id")]
    anchors = gone[keep].copy()
    anchors["_prev"] = gone["split"].astype(str).to_numpy()
    anchors["_anchor"] = True
    return anchors.reindex(columns=df.columns)


def _groups_and_quarantine(
    df: pd.DataFrame, radius: int, group_column: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(rows kept with group_id, quarantined rows, sticky conflicts left among previous images)."""
    quarantined = []
    while True:
        df = df.copy()
        phashes, variants = table_hashes(df)
        keys = df[group_column].tolist() if group_column and group_column in df.columns else None
        df["group_id"] = near_duplicate_groups(
            phashes, radius, ids=df["image_id"].tolist(), variants=variants, keys=keys
        )
        split_of_group, conflicts = _sticky_group_splits(df)
        bridging = _bridging_images(df, conflicts)
        if bridging.empty:
            return df, pd.DataFrame(quarantined or [], columns=QUARANTINE_COLUMNS), conflicts
        quarantined.extend(bridging.to_dict("records"))
        df = df[~df["image_id"].isin(bridging["image_id"])].reset_index(drop=True)


def assign_splits(
    images: pd.DataFrame, cfg: SplitConfig | None = None, previous: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Assign every image table row a split.

    Returns a DataFrame with columns `image_id, split, group_id, label` followed by every other
    image table column, one row per image table row except quarantined ones, sorted by image_id.
    `df.attrs["quarantined"]` lists the new images left out because they bridge near-duplicates in
    different splits (QUARANTINE_COLUMNS); `df.attrs["sticky_conflicts"]` lists groups whose
    previous images still sit in more than one split without a new image between them (each keeps
    its own split; the near-duplicate check reports them).
    """
    cfg = cfg or SplitConfig()
    ratios = validate_ratios(cfg.ratios)
    _validate_image_table(images)
    _check_group_sizes(images, cfg)
    prev_split = _previous_splits(previous)

    sort_cols = ["image_id"] + [c for c in ("uri", "file") if c in images.columns]
    df = images.sort_values(sort_cols, kind="mergesort").reset_index(drop=True).copy()
    df["label"] = df["label"].astype(np.int64)
    df["_prev"] = df["image_id"].map(prev_split)  # NaN for images new in this version
    df["_anchor"] = False
    anchors = _vanished_anchors(previous, df)
    if len(anchors):
        df = pd.concat([df, anchors], ignore_index=True).sort_values(sort_cols, kind="mergesort")
        df = df.reset_index(drop=True)
    df, quarantined, _ = _groups_and_quarantine(df, cfg.radius, cfg.group_column)
    if len(quarantined):
        log.warning(
            "%d new images bridge near-duplicates in different splits and are quarantined (e.g. %s)",
            len(quarantined),
            quarantined["bridges"].head(3).tolist(),
        )

    # The groups' previous splits are decided with the anchors; then the anchors leave the table.
    split_of_group, conflicts = _sticky_group_splits(df)
    df = df[~df["_anchor"].astype(bool)].drop(columns="_anchor").reset_index(drop=True)
    df = df.astype({c: t for c, t in images.dtypes.items() if c in df.columns and c != "label"})
    df["label"] = df["label"].astype(np.int64)

    # Per group: size, majority label (ties -> 1, the class we must not miss), previous split if any.
    groups = df.groupby("group_id", sort=True).agg(size=("label", "size"), pos=("label", "sum"))
    groups["stratum"] = (2 * groups["pos"] >= groups["size"]).astype(np.int64)
    groups["key"] = [content_key(cfg.salt, g) for g in groups.index]

    if conflicts:
        log.warning(
            "%d near-duplicate groups hold previous images from different splits (e.g. %s); each keeps "
            "its split and check_no_near_duplicates_across_splits will report the pairs",
            len(conflicts),
            conflicts[:5],
        )

    # Counts per (stratum, split) already fixed by stickiness, then fill free groups below target.
    names = [s.value for s in SPLIT_ORDER]
    target = np.array([ratios[s] for s in names])  # (4,)
    fixed_rows = df[df["group_id"].isin(split_of_group.keys())]
    fixed_split = fixed_rows["_prev"].fillna(fixed_rows["group_id"].map(split_of_group))
    fixed_counts = (
        pd.crosstab(fixed_rows["group_id"].map(groups["stratum"]), fixed_split)
        .reindex(index=[0, 1], columns=names, fill_value=0)
        .astype(float)
    )  # (2 strata, 4 splits) images already placed
    for stratum, sgroups in groups.groupby("stratum", sort=True):
        counts = fixed_counts.loc[stratum].to_numpy().copy()  # (4,)
        stratum_total = float(sgroups["size"].sum())
        free = sgroups.loc[~sgroups.index.isin(split_of_group.keys())].sort_values("key", kind="mergesort")
        for gid, size in zip(free.index, free["size"]):
            fill = counts / (target * stratum_total)  # fraction of each split's target reached
            chosen = int(np.argmin(fill))  # first (in SPLIT_ORDER) among ties
            split_of_group[gid] = names[chosen]
            counts[chosen] += size
        log.debug("stratum %s: %s", stratum, dict(zip(names, counts.tolist())))

    df["split"] = df["group_id"].map(split_of_group)
    has_prev = df["_prev"].notna()
    df.loc[has_prev, "split"] = df.loc[has_prev, "_prev"]  # an image never leaves its previous split
    df = df.drop(columns="_prev")
    df = df[LEADING_COLUMNS + [c for c in df.columns if c not in LEADING_COLUMNS]]
    df.attrs["sticky_conflicts"] = conflicts
    df.attrs["quarantined"] = quarantined.to_dict("records")  # plain records: attrs are compared on concat
    return df


def split_history(
    table: pd.DataFrame, previous: pd.DataFrame | None, version: str, group_column: str | None = GROUP_COLUMN
) -> pd.DataFrame:
    """Every image assigned a split up to and including this version: the rows of `table` (this version's
    splits) and the rows of `previous` (the previous version's history, or its splits table) whose image
    is no longer in it, with the split it held and `last_version`, the last version that held it.

    Pass it as the next version's `previous`: a vanished image then anchors its group in every later
    version, so a copy of a val_test image deleted two versions ago still cannot land in train, and the
    deleted image itself, put back later, returns to its old split. Sorted by image_id."""
    cols = [c for c in (*HISTORY_COLUMNS, group_column) if c and c in table.columns]
    now = table[cols].assign(last_version=version)
    if previous is not None and len(previous):
        _previous_splits(previous)  # validated: known splits, one split per image
        gone = previous[~previous["image_id"].isin(table["image_id"])].drop_duplicates("image_id")
        gone = gone[[c for c in cols + ["last_version"] if c in gone.columns]]
        if "last_version" not in gone.columns:  # a splits table written before histories existed
            gone = gone.assign(last_version="(earlier)")
        now = pd.concat([now, gone.reindex(columns=now.columns)], ignore_index=True)
    now = now.sort_values("image_id", kind="mergesort").reset_index(drop=True)
    return now.astype({"split": str, "last_version": str})


def split_summary(splits: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {"n": rows, "positives": label==1 rows}} for every split (JSON-serialisable)."""
    out: dict[str, dict[str, int]] = {}
    for s in SPLIT_ORDER:
        rows = splits[splits["split"] == s.value]
        out[s.value] = {"n": int(len(rows)), "positives": int((rows["label"] == 1).sum())}
    return out
