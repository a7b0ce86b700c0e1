"""`roadwork` console script: make-demo-data, predict, serve.

The Dagster side (the demo run, the ablation) lives in roadwork_assets and is run with
`python -m roadwork_commands.demo` / `python -m roadwork_commands.ablation`; this module stays free of
dagster so that serving (`roadwork predict`, `roadwork serve --bundle`) imports only the PyTorch core;
`roadwork serve --latest` alone reads the Dagster instance, in roadwork_assets.released.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_demo_data(args: argparse.Namespace) -> int:
    from roadwork_core.data.drops import version_name_problem
    from roadwork_core.data.synthetic import make_demo_drop

    if (problem := version_name_problem(args.version)) is not None:
        print(f"roadwork make-demo-data: --version {args.version!r} {problem}", file=sys.stderr)
        return 2
    target = Path(args.out) / args.version
    if target.exists() and any(target.iterdir()) and not args.replace:
        print(
            f"roadwork make-demo-data: {target} exists already (a drop may have been trained on); choose another "
            "--version, or pass --replace to write it again",
            file=sys.stderr,
        )
        return 2
    drop = make_demo_drop(
        Path(args.out), args.version, n=args.n, seed=args.seed, n_unlabelled=args.n_unlabelled
    )
    print(
        f"wrote drop {drop} ({args.n} labelled images, {args.n_unlabelled} unlabelled; _READY written last)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roadwork", description="roadwork / no-roadwork classifier platform"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "make-demo-data", help="write a synthetic street-scene drop (DIR/NAME/..., _READY last)"
    )
    demo.add_argument("--out", required=True, help="inbox folder; the drop goes to OUT/VERSION")
    demo.add_argument(
        "--version", required=True, help="drop name, e.g. v0001 or 2026-11-23 (sorts chronologically)"
    )
    demo.add_argument("--n", type=int, default=2000, help="labelled images (default 2000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--n-unlabelled", type=int, default=0, help="extra images in unlabelled/ (ExPLoRA pool)"
    )
    demo.add_argument(
        "--replace", action="store_true", help="write the drop again when OUT/VERSION exists already"
    )
    demo.set_defaults(func=_make_demo_data)

    from roadwork_core.bundle.predict_cli import add_predict_arguments, run_predict

    predict = sub.add_parser(
        "predict",
        help="p_roadwork + decision per image as JSON lines; with no IMAGES, base64 JPEGs from stdin, one per line",
    )
    add_predict_arguments(predict)
    predict.set_defaults(func=run_predict)

    from roadwork_core.serving.serve_cli import add_serve_arguments, run_serve

    serve = sub.add_parser(
        "serve",
        help="a warm miner on 127.0.0.1: POST /predict {image: base64 JPEG} -> answer; --latest follows releases",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
