"""Audit of the split contract: every asset that reads splits records `splits_read`; these checks
compare what it read with SPLIT_CONTRACT, one blocking check per consuming asset."""

import dagster as dg

from roadwork_assets._util import latest_materialization_metadata
from roadwork_assets.partitions import dataset_version
from roadwork_core.contracts import SPLIT_CONTRACT, allowed_splits, audit_splits_read
from roadwork_core.contracts.splits import audit_hashes_read


def _contract_check(asset_name: str) -> dg.AssetChecksDefinition:
    allowed = sorted(s.value for s in allowed_splits(asset_name))
    hashes_of = sorted(s.value for s in SPLIT_CONTRACT[asset_name].hashes_of)

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
        # assets granted hashes (ExPLoRA's unlabelled pool filter) must have read exactly those
        hash_problems = audit_hashes_read(asset_name, meta.get("hashes_read")) if hashes_of else []
        if bad:
            description = (
                f"{asset_name} read {bad}, which its contract forbids ({SPLIT_CONTRACT[asset_name].why})"
            )
        elif hash_problems:
            description = f"{asset_name} " + "; ".join(hash_problems) + f" ({SPLIT_CONTRACT[asset_name].why})"
        else:
            description = f"read {sorted(read)}; allowed {allowed}" + (
                f"; filtered against the hashes of {hashes_of}" if hashes_of else ""
            )
        return dg.AssetCheckResult(
            passed=not bad and not hash_problems,
            description=description,
            metadata={
                "splits_read": dg.MetadataValue.json(list(read)),
                "allowed": dg.MetadataValue.json(allowed),
            },
        )

    return _check


CONTRACT_CHECKS = [_contract_check(name) for name in SPLIT_CONTRACT]
