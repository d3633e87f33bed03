"""The README's demo figures, generated from metrics.json so that they never drift from what a run measures.

``python -m pipelines.readme_figures`` rewrites the block between the markers in README.md
from the metrics.json that ``dvc repro`` wrote; a test fails when the two disagree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- demo figures: generated from metrics.json by python -m pipelines.readme_figures -->", \
    "<!-- end of demo figures -->"
COLUMNS = ("", "baseline_raw_pixels.", "baseline_untrained.")


def _percent(metrics: dict, key: str) -> str:
    mean, interval = metrics.get(f"{key}.mean", metrics.get(key)), metrics.get(f"{key}.ci95")
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} %" + (f" ± {100 * interval:.1f}" if interval is not None else "")


def render(metrics: dict) -> str:
    """The demo table and the unknown-class sentence, from the flat metrics of an evaluate stage."""
    rows = [
        (f"known classes: top-1 on the test split ({metrics['n_queries']} queries)", "top1", _percent),
        ("known classes: MAP@R", "map_at_r", lambda m, k: f"{m[k]:.3f}" if k in m else "-"),
    ]
    for shots in (1, 5):
        key = f"fewshot.{shots}shot"
        if f"{key}.mean" in metrics:
            rows.append((f"held-out classes: {metrics[f'{key}.n_way']}-way {shots}-shot "
                         f"({metrics[f'{key}.episodes']} episodes)", key, _percent))
    lines = ["| | trained network | raw pixels | untrained network |", "|---|---|---|---|"]
    for title, key, fmt in rows:
        cells = [fmt(metrics, prefix + key) for prefix in COLUMNS]
        lines.append(f"| {title} | **{cells[0]}** | {cells[1]} | {cells[2]} |")
    if "open_set.auroc" in metrics:
        lines += ["", f"Telling a held-out class from the known ones is harder. The AUROC of the nearest distance "
                      f"is {metrics['open_set.auroc']:.3f}; at the calibrated threshold "
                      f"({metrics.get('calibration.threshold', float('nan')):.4f}, best F1, its figures cross-fitted "
                      f"on the test queries) {100 * metrics['open_set.known_accepted']:.1f} % of known queries are "
                      f"accepted and {100 * metrics['open_set.unknown_rejected']:.1f} % of held-out images rejected."]
    return "\n".join([START, *lines, END])


def update(readme: Path, metrics_file: Path) -> bool:
    """Rewrite the generated block of ``readme``; returns whether it changed."""
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no generated block (the markers {START!r} ... {END!r})")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    new = before + render(json.loads(metrics_file.read_text(encoding="utf-8"))) + after
    readme.write_text(new, encoding="utf-8")
    return new != text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics.json"))
    args = parser.parse_args()
    print(f"{args.readme}: {'updated' if update(args.readme, args.metrics) else 'already up to date'}")


if __name__ == "__main__":
    main()
