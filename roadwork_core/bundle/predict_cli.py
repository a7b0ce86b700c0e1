"""`roadwork predict --bundle DIR [IMAGES...]`: one JSON line per image.

With image arguments each is a file path (or `<parquet>#row=<n>`) and is named by its argument.
Without, stdin carries one base64-encoded JPEG per line (the way the network's synapse carries
images), named `stdin:<n>` (n counts from 0, blank lines skipped). A line per image:
    {"image": name, "p_roadwork": ..., "decision": ..., "answer": ..., "logit": ..., "p_raw": ..., <features>}
or, for an image that cannot be read or decoded, {"image": name, "error": "..."}; the others are
still predicted and the exit code is 1 at the end. A bundle that fails its checks exits with 2.

With `--answer` each line is just the subnet answer, the float a miner puts in the synapse's
`prediction` (roadwork_core.subnet.answer); an image that cannot be decoded prints `nan` there (so
line n stays image n) and its reason on stderr, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the bundle (torch, timm) is imported where a command runs, not to build the parser
    from roadwork_core.bundle.bundle import Bundle
    from roadwork_core.bundle.decode import ImageInput

__all__ = ["add_predict_arguments", "predict_command", "run_predict"]

EXIT_OK, EXIT_BAD_IMAGE, EXIT_BAD_BUNDLE = 0, 1, 2


# Line widths of wrapped base64 (coreutils `base64` and MIME: 76; `openssl base64`, PEM: 64). A whole image
# that short (48 or 57 bytes) cannot be a photograph, so such a line is a wrapped image's first part.
WRAP_WIDTHS = (64, 76)


def _stdin_items(stdin: TextIO) -> Iterator[tuple[str, ImageInput | Exception]]:
    """Lines of base64 -> (name, bytes), or (name, ValueError) for a line that is not base64."""
    n = 0
    for line in stdin:
        text = line.strip()
        if not text:
            continue
        name = f"stdin:{n}"
        n += 1
        if len(text) in WRAP_WIDTHS:
            yield (
                name,
                ValueError(
                    f"{name}: a line of exactly {len(text)} characters, so the base64 looks wrapped (`base64` wraps at "
                    f"76 columns, `openssl base64` at 64) and one image spans several lines; send one image per line: "
                    f"`base64 -w0 image.jpg`"
                ),
            )
            continue
        try:
            yield name, base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            yield name, ValueError(f"{name}: invalid base64 ({err}); send one base64-encoded JPEG per line")


def _line(name: str, result: object) -> str:
    if isinstance(result, Exception):
        return json.dumps({"image": name, "error": str(result) or type(result).__name__})
    return json.dumps({"image": name, **result.to_dict()})


def _answer_line(name: str, result: object) -> str:
    if isinstance(result, Exception):
        text = str(result) or type(result).__name__
        prefix = "" if text.startswith(f"{name}:") else f"{name}: "  # most errors already name the image
        print(f"roadwork predict: {prefix}{text}", file=sys.stderr)
        return "nan"
    return repr(float(result.answer))


def predict_command(
    bundle_dir: str,
    images: list[str],
    stdin: TextIO | None,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    bundle: Bundle | None = None,
    answer_only: bool = False,
) -> Iterator[str]:
    """One line per image, in input order: JSON, or the bare answer with `answer_only` (module doc).

    `bundle` skips re-loading."""
    from roadwork_core.bundle.bundle import Bundle

    bundle = bundle if bundle is not None else Bundle.load(bundle_dir, device=device)
    items: Iterable[tuple[str, ImageInput | Exception]]
    if images:
        items = ((path, path) for path in images)
    elif stdin is not None:
        items = _stdin_items(stdin)
    else:
        raise ValueError("roadwork predict: give image paths, or base64 JPEG lines on stdin")
    render = _answer_line if answer_only else _line
    for name, result in bundle.iter_predict(items, batch_size=batch_size):
        yield render(name, result)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give an integer >= 1")
    return value


def poll_seconds(text: str) -> float:
    """argparse type: seconds between 0.1 and one day (0, a negative number or NaN polled in a tight loop at
    a whole core; inf and 1e12 killed the release watcher with OverflowError)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 86_400:  # False for NaN
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give seconds between 0.1 and 86400")
    return value


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--bundle", required=True, help="bundle directory written by the bundle asset")
    parser.add_argument(
        "images", nargs="*", help="image files; none: read base64 JPEGs from stdin, one per line"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per model forward (default 16)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    parser.add_argument(
        "--answer",
        action="store_true",
        help="print only the subnet answer per image (one float a line: what a miner sends the validator)",
    )
    return parser


def run_predict(args: argparse.Namespace, stdout: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """Print the JSON lines; exit code 0, 1 if any image failed, 2 if the bundle was refused."""
    from roadwork_core.bundle.bundle import Bundle
    from roadwork_core.bundle.parts import device_problem
    from roadwork_core.bundle.schema import BundleError

    out = stdout if stdout is not None else sys.stdout
    if (problem := device_problem(args.device)) is not None:
        print(f"roadwork predict: --device {args.device}: {problem}", file=sys.stderr)
        return EXIT_BAD_BUNDLE
    try:
        bundle = Bundle.load(args.bundle, device=args.device)
    except (BundleError, OSError) as err:
        print(f"roadwork predict: cannot use bundle {args.bundle}: {err}", file=sys.stderr)
        return EXIT_BAD_BUNDLE
    answer_only = bool(getattr(args, "answer", False))
    if answer_only and not bundle.answer_rule.n:
        print(f"roadwork predict: note: {bundle.answer_rule.source}", file=sys.stderr)
    source = None if args.images else (stdin if stdin is not None else sys.stdin)
    code, n_lines = EXIT_OK, 0
    lines = predict_command(
        args.bundle,
        list(args.images),
        source,
        batch_size=args.batch_size,
        bundle=bundle,
        answer_only=answer_only,
    )
    try:
        for line in lines:
            failed = line == "nan" if answer_only else ('"error"' in line and "error" in json.loads(line))
            if failed:
                code = EXIT_BAD_IMAGE
            print(line, file=out, flush=True)
            n_lines += 1
    except BrokenPipeError:  # the reader stopped (`| head -1`): stop quietly, as other command-line tools do
        if out is sys.stdout:  # and let the interpreter's last flush of stdout go nowhere, not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return code
    if n_lines == 0:  # only stdin can be empty: argparse gives at least one path otherwise
        print(
            "roadwork predict: no images: stdin was empty; give image paths, or base64 JPEG lines on stdin",
            file=sys.stderr,
        )
        return EXIT_BAD_IMAGE
    return code


def main(argv: list[str] | None = None) -> int:
    parser = add_predict_arguments(argparse.ArgumentParser(prog="roadwork predict", description=__doc__))
    return run_predict(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
