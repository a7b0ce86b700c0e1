"""The StreetVision validator, replicated: what it does to an image and how it rewards an answer.

`challenge` turns an image into the 224x224 JPEG a miner receives (levels 0-3), `reward` gives the
per-query reward the validator would give a sequence of answers. Facts come from the subnet's public
validator code (natixnetwork/streetvision-subnet, MIT); the code here is our own.
"""
