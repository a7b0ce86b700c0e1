import dagster as dg

# One partition per data drop; version v = every complete drop whose name sorts at or before v.
dataset_version = dg.DynamicPartitionsDefinition(name="dataset_version")
