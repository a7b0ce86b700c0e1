from roadwork_core.contracts.splits import (
    SPLIT_CONTRACT,
    Split,
    SplitContractViolation,
    SplitReader,
    SplitRule,
    allowed_splits,
    audit_splits_read,
)

__all__ = [
    "SPLIT_CONTRACT",
    "Split",
    "SplitContractViolation",
    "SplitReader",
    "SplitRule",
    "allowed_splits",
    "audit_splits_read",
]
