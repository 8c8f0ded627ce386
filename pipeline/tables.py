"""The one writer of result tables (scores, evaluations, reproduction and demo tables) in every format.

A stage describes its result as a `Table`: the rows, the provenance of the features behind them
(pipeline.provenance) and, for JSON, the context a reader needs. `write_table` picks the format from
the file's suffix, so a new format is one function in FORMATS, and every format carries the
provenance the same way: a `note` headline first in JSON and Markdown (random backbones shouting),
the random_weights and config_hash columns on every CSV row. CSV cells a spreadsheet would run as a
formula (a video named `=1+2.mp4`) are escaped with a leading single quote, and cells holding line
breaks are quoted (manifests.files.rows_to_csv); JSON keeps every value exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from manifests.files import atomic_write_bytes, rows_to_csv
from pipeline.provenance import headline

PROVENANCE = ("random_weights", "config_hash")


@dataclass
class Block:
    """One Markdown table: a caption above it, the header, and rows of cells already formatted."""

    header: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Table:
    what: str  # the headline's subject, e.g. "evaluation of run R"
    made: dict[str, Any]  # pipeline.provenance of the features behind every row
    rows: list[dict[str, Any]]  # one dict per row, its keys the columns in order
    # JSON: fields after the provenance (run, labels, ...), then the rows under `rows_key`; None leaves
    # the rows out when the context holds them in a richer shape than flat columns
    context: dict[str, Any] = field(default_factory=dict)
    rows_key: str | None = "rows"
    # flat formats: a list under KEY becomes the columns TEMPLATE.format(1), TEMPLATE.format(2), ...
    expand: dict[str, str] = field(default_factory=dict)
    blocks: list[Block] | None = None  # Markdown: this layout instead of one table of the flat rows

    @property
    def note(self) -> str:
        return headline(self.what, self.made)


def flat_rows(table: Table) -> list[dict[str, Any]]:
    """Rows of scalar cells: lists expanded into numbered columns, and the provenance on every row (a
    row that carries its own, e.g. one per action, keeps it in its place)."""
    rows = []
    for row in table.rows:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if key in table.expand:
                flat.update({table.expand[key].format(i + 1): v for i, v in enumerate(value or [])})
            else:
                flat[key] = value
        rows.append({**flat, **{k: table.made[k] for k in PROVENANCE if k not in flat}})
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))  # rows may lack columns others have


def _cell(value: Any) -> Any:
    """An empty cell for a missing or undefined number (a constant prediction has no rho)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def csv_text(table: Table) -> str:
    rows = flat_rows(table)
    columns = _columns(rows)
    return rows_to_csv([columns, *([_cell(row.get(c)) for c in columns] for row in rows)])  # video ids: any text


def json_safe(value: Any) -> Any:
    """NaN as null, so the file is JSON any reader accepts."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(table: Table) -> str:
    """{"note", random_weights, config_hash, **context, rows_key: rows}: unsorted, so the note comes first."""
    payload = {"note": table.note, **{k: table.made[k] for k in PROVENANCE}, **table.context}
    if table.rows_key is not None:
        payload[table.rows_key] = [{k: v for k, v in row.items() if not (k in PROVENANCE and v == table.made[k])}
                                   for row in table.rows]
    return json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"


def markdown_text(table: Table) -> str:
    """## note, then each block (by default one table of the flat rows, first column left-aligned)."""
    blocks = table.blocks
    if blocks is None:
        rows = flat_rows(table)
        columns = _columns(rows)
        blocks = [Block(columns, [[str(_cell(row.get(c))) for c in columns] for row in rows])]
    lines = [f"## {table.note}", ""]
    for block in blocks:
        if block.caption:
            lines += [block.caption, ""]
        lines.append("| " + " | ".join(block.header) + " |")
        lines.append("|---|" + "---:|" * (len(block.header) - 1))
        lines += ["| " + " | ".join(cells) + " |" for cells in block.rows]
        lines.append("")
    return "\n".join(lines) + "\n"


FORMATS: dict[str, Callable[[Table], str]] = {".csv": csv_text, ".json": json_text, ".md": markdown_text}


def write_table(table: Table, path: Path) -> Path:
    """The table in the format its suffix names, written atomically (a full disk leaves no half file)."""
    path = Path(path)
    render = FORMATS.get(path.suffix.lower())
    if render is None:
        raise ValueError(f"{path}: a table is written as {', '.join(sorted(FORMATS))}, not {path.suffix or 'no suffix'}")
    atomic_write_bytes(path, render(table).encode())
    return path
