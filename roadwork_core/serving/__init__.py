"""A warm miner process: `roadwork serve` (FastAPI + uvicorn) with hot bundle swap."""

DEFAULT_MAX_IMAGE_BYTES = (
    8 * 1024 * 1024
)  # the largest image /predict accepts; a 224 px validator JPEG is ~20 KiB
