"""`python -m roadwork_commands.partitions add v0002 [v0003 ...]` registers `dataset_version`
partitions by hand (the new-drop sensor does it on its own), each a ready drop in ROADWORK_INBOX; `delete
v0002` removes one (its runs and materializations stay in the instance's history, and its splits still bind
the versions after it); `list` prints them."""

import argparse
import sys

import dagster as dg

from roadwork_assets._util import late_version_message, late_versions
from roadwork_assets.partitions import dataset_version
from roadwork_core.data.drops import READY, list_ready_drops, version_key, version_name_problem
from roadwork_core.data.images import printable_name
from roadwork_resources.paths import inbox_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["add", "delete", "list"])
    parser.add_argument("versions", nargs="*")
    args = parser.parse_args(argv)
    instance = dg.DagsterInstance.get()
    if args.action == "add":
        if not args.versions:
            parser.error("add needs at least one version name")
        for version in args.versions:
            if (problem := version_name_problem(version)) is not None:
                parser.error(f"{printable_name(version)!r} cannot be a dataset version: it {problem}")
        new = [  # each once: a name given twice failed the insert with a UNIQUE constraint traceback
            v
            for v in dict.fromkeys(args.versions)
            if not instance.has_dynamic_partition(dataset_version.name, v)
        ]
        for version, newest in late_versions(instance, new).items():
            parser.error(late_version_message(version, newest))
        ready = list_ready_drops(inbox_root())
        for version in new:
            if version not in ready:
                parser.error(
                    f"{version!r} is not a ready drop in {inbox_root()} (ROADWORK_INBOX): a partition needs its "
                    f"drop folder {inbox_root() / version} holding the {READY} marker; copy the drop, then "
                    f"write {READY} last, then add it (ready drops: {ready or 'none'})"
                )
        instance.add_dynamic_partitions(dataset_version.name, new)
        print(f"added {new or 'nothing (all present)'}")
    elif args.action == "delete":
        if not args.versions:
            parser.error("delete needs at least one version name")
        from roadwork_assets.released import released_bundle

        gone = [v for v in args.versions if instance.has_dynamic_partition(dataset_version.name, v)]
        before = released_bundle(instance)
        for version in gone:
            instance.delete_dynamic_partition(dataset_version.name, version)
        print(f"deleted {gone or 'nothing (none present)'}")
        if before is not None and before.partition in gone:
            after = released_bundle(instance)
            print(
                f"note: {before.partition}'s bundle was the release `roadwork serve --latest` served; it no longer "
                "is: "
                + (
                    f"the release of {after.partition} (run {after.run_id[:8]}) takes over"
                    if after
                    else "no release is left"
                )
            )
        split = set(instance.get_materialized_partitions(dg.AssetKey("splits")))
        for version in (v for v in gone if v in split):
            print(
                f"note: {version} was split; its split history still binds the versions after it (an image it "
                f"placed keeps its split), and a new drop must still sort after the newest split version"
            )
    for version in sorted(instance.get_dynamic_partitions(dataset_version.name), key=version_key):
        print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
