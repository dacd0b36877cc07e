"""The toy command's outputs: its JSON files and Markdown tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flowvae.io import atomic_write_text


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The grid's metric table; † marks a log Z over the box only (targets without a finite normaliser).

    ESS % is the Kish effective sample size of the importance weights as a share of the samples;
    'q in box %' the share of q's samples inside the plotting window.
    """
    lines = [
        "| target | flow | K | ELBO | IS log Z | ESS % | quadrature log Z | KL(q‖p) = log Z − ELBO "
        "| q in box % | fit s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        quad = fmt(r["log_z_quadrature"]) + ("" if r["proper"] else " †")
        lines.append(
            f"| {r['target']} | {r['flow']} | {r['flow_steps']} | {fmt(r['elbo'])} | {fmt(r['is_log_z'])} "
            f"| {100 * r['ess_fraction']:.1f} | {quad} | {fmt(r['kl'])} | {100 * r['q_mass_in_box']:.1f} "
            f"| {r['fit_seconds']:.0f} |"
        )
    if any(not r["proper"] for r in rows):
        lines.append("")
        lines.append(
            "† improper target (its integral over ℝ² diverges, e.g. the unconfined U2–U4): the "
            "quadrature covers its box only, so no KL is given."
        )
    return "\n".join(lines) + "\n"


def single_markdown(row: dict[str, Any], command: str) -> str:
    keys = [
        "elbo",
        "elbo_stderr",
        "is_log_z",
        "ess",
        "ess_fraction",
        "log_z_exact",
        "log_z_quadrature",
        "log_z_source",
        "kl",
        "is_log_z_error",
        "q_mass_in_box",
        "fit_seconds",
        "skipped_updates",
    ]
    lines = [
        f"# {row['target']} · {row['flow']} K={row['flow_steps']}",
        "",
        f"`{command}`",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {fmt(row.get(k), 4)} |" for k in keys]
    return "\n".join(lines) + "\n"
