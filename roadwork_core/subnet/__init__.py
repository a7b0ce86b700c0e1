"""The StreetVision validator, replicated: what it does to an image and how it rewards an answer.

`challenge` turns an image into the 224x224 JPEG a miner receives (levels 0-3), `reward` gives the
per-query reward the validator would give a sequence of answers, `answer` the float a
miner sends (always committing, thresholded for the reward on val_calib). Facts come from the subnet's public
validator code (natixnetwork/streetvision-subnet, MIT); the code here is our own.
"""
