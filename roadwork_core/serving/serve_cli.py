"""`roadwork serve --bundle DIR | --latest`: a warm miner process on 127.0.0.1 (see app.py).

`--latest` follows the newest released bundle of the Dagster instance at DAGSTER_HOME (the `bundle`
asset's latest materialization whose blocking checks passed) and swaps to each new release without a
restart. Reading the instance happens in a background thread (roadwork_assets.released); the request
path never touches Dagster.
"""

from __future__ import annotations

import argparse
import logging
import sys

from roadwork_core.bundle.predict_cli import poll_seconds, positive_int
from roadwork_core.serving import DEFAULT_MAX_IMAGE_BYTES

__all__ = ["add_serve_arguments", "request_head_deadline", "run_serve"]

EXIT_NO_BUNDLE = 2
# A connection must start a request within this many seconds of opening: uvicorn times out a request's
# body (the app, 30 s) and an idle keep-alive connection (5 s), but not a connection that never sends a
# byte, and 260 such held every --max-connections slot (503 for everyone) for as long as they stayed open.
REQUEST_HEAD_SECONDS = 10.0


def request_head_deadline(seconds: float = REQUEST_HEAD_SECONDS) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, as uvicorn's own choice) that closes a
    connection which has not started a request `seconds` after it opened."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # no httptools: uvicorn uses h11
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class RequestHeadDeadline(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_overdue)

        def _head_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request has started
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return RequestHeadDeadline


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", help="serve this bundle directory")
    which.add_argument(
        "--latest",
        action="store_true",
        help="serve the newest released bundle of the Dagster instance (DAGSTER_HOME) and follow new releases",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8091, help="port (default 8091)")
    parser.add_argument(
        "--poll-seconds",
        type=poll_seconds,
        default=10.0,
        help="--latest: how often to look for a release (0.1-86400 s)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="largest accepted image (413 above)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        help="images decoded and predicted at once (default: one per core); more requests wait their turn",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=256,
        help="open connections and tasks at most; past it new requests get 503 (default 256)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # imported here: `roadwork predict` should not pay for the web stack

    from roadwork_core.bundle.parts import device_problem
    from roadwork_core.serving.app import create_app
    from roadwork_core.serving.slot import BundleSlot, Candidate, SwapRefused, load_verified
    from roadwork_core.serving.watch import ReleaseWatcher

    if (problem := device_problem(args.device)) is not None:
        print(f"roadwork serve: --device {args.device}: {problem}", file=sys.stderr)
        return EXIT_NO_BUNDLE
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # swaps and refusals at INFO; not the storage's per-poll chatter
    logging.getLogger("roadwork.serve").setLevel(logging.INFO)
    source = None
    if args.latest:
        # reads the Dagster instance (here and in the watcher thread; never in the request path)
        from roadwork_assets.released import latest_release_candidate, release_candidates

        source = latest_release_candidate
        try:
            candidates = release_candidates()
        except Exception as err:  # DAGSTER_HOME unset or missing, storage unreadable: say which and stop
            print(f"roadwork serve: cannot read the Dagster instance (DAGSTER_HOME): {err}", file=sys.stderr)
            return EXIT_NO_BUNDLE
        if not candidates:
            print(
                "roadwork serve: no released bundle in this Dagster instance yet (DAGSTER_HOME); materialize "
                "the graph first (make demo), or serve a directory with --bundle",
                file=sys.stderr,
            )
            return EXIT_NO_BUNDLE
    else:
        candidates = [Candidate(path=args.bundle, release=f"--bundle {args.bundle}")]
    served, refused = None, []
    for candidate in candidates:  # newest first; an older release serves when a newer one no longer verifies
        try:
            served = load_verified(candidate, args.device)
            break
        except SwapRefused as err:
            refused.append(str(err))
            print(f"roadwork serve: refused {candidate.release or candidate.path}: {err}", file=sys.stderr)
    if served is None:
        print(
            f"roadwork serve: nothing to serve; every candidate was refused ({len(refused)})", file=sys.stderr
        )
        return EXIT_NO_BUNDLE
    slot = BundleSlot(served, device=args.device)
    if source is not None:
        ReleaseWatcher(slot, source, args.poll_seconds).start()
    info = served.info()
    print(
        f"roadwork serve: bundle {info['bundle_id'][:12]} (dataset {info['dataset_version']}, answer threshold "
        f"{info['answer_threshold']:.4g}) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(slot, max_image_bytes=args.max_image_bytes, max_concurrent=args.max_concurrent)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                http=request_head_deadline(), log_level="warning", access_log=False)  # fmt: skip
    return 0
