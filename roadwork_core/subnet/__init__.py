"""The StreetVision subnet's validator, replicated: challenge pipeline, reward, and the miner's answer."""
