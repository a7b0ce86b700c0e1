"""Draw docs/architecture.svg: the asset graph (from the real Definitions) and the package import graph
(from the real source: every `import` / `from ... import`, lazy ones inside functions included).

    python tools/architecture_diagram.py            # rewrite docs/architecture.svg
    python tools/architecture_diagram.py --check    # exit 1 when the committed picture is out of date

Layers are topological generations (networkx): in the asset graph upstream is on the left; in the
package graph a package sits above every package it imports. Both draw the transitive reduction (an
edge implied by a longer path is left out) so that the picture stays readable. The script also refuses a
roadwork_core module that imports dagster (the one layering rule that must never break).
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "architecture.svg"
TOP_PACKAGES = ("roadwork_commands", "roadwork_assets", "roadwork_resources", "roadwork_core")
GROUP_COLORS = {
    "data": "#cfe2f3",
    "training": "#f4cccc",
    "predictions": "#fff2cc",
    "policies": "#d9ead3",
    "release": "#d9d2e9",
}
PACKAGE_COLORS = {
    "roadwork_commands": "#fce5cd",
    "roadwork_assets": "#d9d2e9",
    "roadwork_resources": "#d0e0e3",
    "roadwork_core": "#d9ead3",
}


# ---------------------------------------------------------------------------------------------------
# The two graphs


def asset_graph() -> tuple[nx.DiGraph, dict[str, int]]:
    """upstream -> downstream over the assets of roadwork_assets.definitions; {asset: number of checks}."""
    sys.path.insert(0, str(REPO))
    from roadwork_assets.definitions import defs

    resolved = defs.resolve_asset_graph()
    graph = nx.DiGraph()
    for key in sorted(resolved.get_all_asset_keys()):
        node = resolved.get(key)
        name = key.to_user_string()
        graph.add_node(name, group=node.group_name)
        for parent in sorted(node.parent_keys):
            graph.add_edge(parent.to_user_string(), name)
    checks: dict[str, int] = {}
    for check in resolved.asset_check_keys:
        asset = check.asset_key.to_user_string()
        checks[asset] = checks.get(asset, 0) + 1
    return graph, checks


def package_of(module: str) -> str | None:
    """The diagram node of a module: roadwork_core.<subpackage or module>, or the top package."""
    parts = module.split(".")
    if parts[0] not in TOP_PACKAGES:
        return None
    if parts[0] == "roadwork_core":
        return "roadwork_core." + parts[1] if len(parts) > 1 else None  # the bare package: __version__
    return parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def package_graph() -> tuple[nx.DiGraph, list[str]]:
    """importer -> imported between diagram nodes; the roadwork_core modules that import dagster."""
    graph = nx.DiGraph()
    known = _known_nodes()
    core_dagster: list[str] = []
    for top in TOP_PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            module = _module_name(path)
            source = package_of(module)
            if source is None:
                continue
            graph.add_node(source)
            imported = _imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
            if top == "roadwork_core" and any(n == "dagster" or n.startswith("dagster") for n in imported):
                core_dagster.append(module)
            for name in sorted(imported):
                target = package_of(name)
                if target and target != source and target in known:
                    graph.add_edge(source, target)
    return graph, core_dagster


def _known_nodes() -> set[str]:
    nodes = {"roadwork_commands", "roadwork_assets", "roadwork_resources"}
    core = REPO / "roadwork_core"
    nodes.update(f"roadwork_core.{p.name}" for p in core.iterdir() if (p / "__init__.py").is_file())
    nodes.update(f"roadwork_core.{p.stem}" for p in core.glob("*.py") if p.stem != "__init__")
    return nodes


# ---------------------------------------------------------------------------------------------------
# Drawing


def _generations(graph: nx.DiGraph) -> list[list[str]]:
    """Topological generations of the condensation (import cycles, if any, share a layer)."""
    cond = nx.condensation(graph)
    layers = []
    for gen in nx.topological_generations(cond):
        layers.append(sorted(n for c in gen for n in cond.nodes[c]["members"]))
    return layers


def _box(ax, x: float, y: float, text: str, color: str, width: float, height: float = 0.5) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=color, edgecolor="#444444", linewidth=0.8, zorder=2,
        )
    )  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=8, zorder=3)


def _arrow(ax, start, end, shrink: float, rad: float = 0.0, color: str = "#777777", style: str = "-") -> None:
    ax.annotate(
        "", xy=end, xytext=start, zorder=1,
        arrowprops=dict(arrowstyle="-|>", color=color, lw=0.7, shrinkA=shrink, shrinkB=shrink, linestyle=style,
                        connectionstyle=f"arc3,rad={rad}", mutation_scale=8),
    )  # fmt: skip


def _draw_assets(ax, graph: nx.DiGraph, checks: dict[str, int]) -> None:
    layers = _generations(graph)
    pos = {}
    for i, layer in enumerate(layers):
        for j, name in enumerate(layer):
            pos[name] = (i * 2.1, -(j - (len(layer) - 1) / 2) * 0.8)
    for a, b in sorted(nx.transitive_reduction(graph).edges):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        _arrow(ax, (xa + 0.9, ya), (xb - 0.9, yb), shrink=0, rad=0.0 if xb - xa < 2.2 else -0.15)
    for name, (x, y) in sorted(pos.items()):
        label = name + (
            f"\n{checks[name]} check{'s' if checks[name] > 1 else ''}" if checks.get(name) else ""
        )
        _box(ax, x, y, label, GROUP_COLORS.get(graph.nodes[name]["group"], "#eeeeee"), width=1.8, height=0.6)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(facecolor=c, edgecolor="#444444", label=g) for g, c in GROUP_COLORS.items()],
        loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(GROUP_COLORS), fontsize=8, frameon=False,
    )  # fmt: skip
    ax.set_title(
        "Asset graph (roadwork_assets.definitions; every asset is partitioned by dataset_version). Arrow: "
        "feeds; an edge implied by a longer path\nis not drawn (splits, for one, feeds every asset after it)",
        fontsize=10,
    )
    ax.set_xlim(-1.1, (len(layers) - 1) * 2.1 + 1.1)
    ax.set_ylim(-max(len(x) for x in layers) * 0.4 - 0.3, max(len(x) for x in layers) * 0.4 + 0.3)
    ax.axis("off")


def _upward(a: str, b: str) -> bool:
    """roadwork_core reaching into a Dagster-side package (lazily; `roadwork serve --latest`)."""
    return a.startswith("roadwork_core.") and not b.startswith("roadwork_core.")


def _draw_packages(ax, graph: nx.DiGraph) -> None:
    layered = graph.copy()
    layered.remove_edges_from([(a, b) for a, b in graph.edges if _upward(a, b)])
    if not nx.is_directed_acyclic_graph(layered):
        raise SystemExit(f"import cycle between packages: {nx.find_cycle(layered)}; break it before drawing")
    layers = _generations(layered)  # importers first: roadwork_commands on top
    pos = {}
    width = max(len(layer) for layer in layers)
    for i, layer in enumerate(layers):
        for j, name in enumerate(layer):
            pos[name] = ((j - (len(layer) - 1) / 2) * 2.2, -i * 1.1)
    for a, b in sorted(nx.transitive_reduction(layered).edges):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        _arrow(ax, (xa, ya - 0.22), (xb, yb + 0.22), shrink=0, rad=0.0 if ya - yb < 1.2 else 0.12)
    for a, b in sorted(graph.edges):
        if _upward(a, b):
            (xa, ya), (xb, yb) = pos[a], pos[b]
            _arrow(ax, (xa, ya + 0.22), (xb, yb - 0.22), shrink=0, rad=-0.2, color="#cc0000", style="--")
    for name, (x, y) in sorted(pos.items()):
        top = name.split(".")[0]
        label = name.replace("roadwork_core.", "core.") if top == "roadwork_core" else name
        _box(ax, x, y, label, PACKAGE_COLORS[top], width=1.6, height=0.44)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(facecolor=c, edgecolor="#444444", label=p) for p, c in PACKAGE_COLORS.items()],
        loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(PACKAGE_COLORS), fontsize=8, frameon=False,
    )  # fmt: skip
    ax.set_title(
        "Package import graph from the source (arrow: imports, lazy imports included; an import implied by "
        "a longer path is not drawn).\ncore.* = roadwork_core subpackages and modules, which never import dagster; "
        "red dashed: a lazy import from core up into the Dagster side",
        fontsize=10,
    )
    ax.set_xlim(-width * 1.1 - 0.2, width * 1.1 + 0.2)
    ax.set_ylim(-(len(layers) - 1) * 1.1 - 0.6, 0.6)
    ax.axis("off")


def render(fmt: str = "svg") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assets, checks = asset_graph()
    packages, core_dagster = package_graph()
    if core_dagster:
        raise SystemExit(f"roadwork_core must never import dagster; these modules do: {core_dagster}")
    n_pkg_layers = len(_generations(packages))
    style = {"svg.fonttype": "none", "svg.hashsalt": "roadwork", "font.family": "DejaVu Sans"}
    with plt.rc_context(style):  # text stays text in the SVG; ids do not change between runs
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(15, 4.2 + 1.0 * n_pkg_layers),
            gridspec_kw={"height_ratios": [4.2, 1.0 * n_pkg_layers]},
        )  # fmt: skip
        _draw_assets(top, assets, checks)
        _draw_packages(bottom, packages)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None, dpi=110)
        plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed picture; write nothing"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    svg = render(args.out.suffix.lstrip(".") or "svg")
    if args.check:
        if not args.out.is_file() or args.out.read_bytes() != svg:
            print(f"{args.out} is out of date; run: python tools/architecture_diagram.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(svg)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
