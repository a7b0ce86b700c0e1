"""Audit of the split contract: every asset that reads splits records `splits_read`; these checks
compare what it read with SPLIT_CONTRACT, one blocking check per consuming asset."""

import dagster as dg

from roadwork_assets._util import latest_materialization_metadata
from roadwork_assets.partitions import dataset_version
from roadwork_core.contracts import SPLIT_CONTRACT, allowed_splits, audit_splits_read


def _contract_check(asset_name: str) -> dg.AssetChecksDefinition:
    allowed = sorted(s.value for s in allowed_splits(asset_name))

    @dg.asset_check(
        asset=dg.AssetKey(asset_name),
        name="check_split_contract",
        blocking=True,
        partitions_def=dataset_version,
        description=f"{asset_name} read only {allowed} (split contract)",
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        meta = latest_materialization_metadata(
            context.instance, dg.AssetKey(asset_name), context.partition_key
        )
        read = meta.get("splits_read")
        if read is None:
            return dg.AssetCheckResult(
                passed=False,
                description=f"{asset_name} recorded no 'splits_read' metadata; every asset that reads labelled "
                "images must use SplitReader and record reader_metadata(reader)",
            )
        bad = audit_splits_read(asset_name, read)
        return dg.AssetCheckResult(
            passed=not bad,
            description=(
                f"read {sorted(read)}; allowed {allowed}"
                if not bad
                else f"{asset_name} read {bad}, which its contract forbids ({SPLIT_CONTRACT[asset_name].why})"
            ),
            metadata={
                "splits_read": dg.MetadataValue.json(list(read)),
                "allowed": dg.MetadataValue.json(allowed),
            },
        )

    return _check


CONTRACT_CHECKS = [_contract_check(name) for name in SPLIT_CONTRACT]
