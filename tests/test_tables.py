"""pipeline.tables, the one writer of result tables: every format carries the provenance, undefined
numbers are empty cells (CSV) or null (JSON), and the demo keeps its per-clip table off the screen.

Breaks tried: flat_rows without the provenance columns fails both CSV tests; json_text without
json_safe writes NaN, which json.loads reads back as nan, not None, and fails the JSON test;
extract_report returning every line fails the report test."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest

from pipeline.stages.demo import extract_report
from pipeline.tables import FORMATS, Table, write_table

RANDOM = {"random_weights": True, "config_hash": "abc123"}


def _table() -> Table:
    rows = [{"clip": "a.mp4", "score": 1.5, "error": None, "weights": [0.25, 0.75]},
            {"clip": "b.mp4", "score": math.nan, "error": "cannot decode", "weights": None}]
    return Table("scores of run R", RANDOM, rows, context={"run": "/runs/R"}, rows_key="scores",
                 expand={"weights": "grade_{}_weight"})


def test_csv_rows_carry_the_provenance_and_empty_cells(tmp_path):
    path = write_table(_table(), tmp_path / "t.csv")
    table = pd.read_csv(path, keep_default_na=False)
    assert list(table.columns) == ["clip", "score", "error", "grade_1_weight", "grade_2_weight",
                                   "random_weights", "config_hash"]
    assert table["random_weights"].tolist() == [True, True] and set(table["config_hash"]) == {"abc123"}
    assert table.loc[1, "score"] == "" and table.loc[1, "grade_1_weight"] == ""  # NaN and a missing list
    assert table.loc[0, "grade_2_weight"] == "0.75"


def test_a_row_with_its_own_provenance_keeps_it_in_place(tmp_path):
    rows = [{"name": "Ball", "random_weights": False, "config_hash": "b1", "rho": 0.5},
            {"name": "Hoop", "rho": 0.25}]
    text = write_table(Table("t", RANDOM, rows), tmp_path / "t.csv").read_text()
    assert text.splitlines() == ["name,random_weights,config_hash,rho", "Ball,False,b1,0.5", "Hoop,True,abc123,0.25"]


def test_json_puts_the_note_first_and_writes_null_for_nan(tmp_path):
    text = write_table(_table(), tmp_path / "t.json").read_text()
    assert text.lstrip("{\n ").startswith('"note": "RANDOM-WEIGHT BACKBONES: scores of run R')
    written = json.loads(text)
    assert written["random_weights"] is True and written["config_hash"] == "abc123" and written["run"] == "/runs/R"
    assert written["scores"][1]["score"] is None and written["scores"][0]["weights"] == [0.25, 0.75]
    assert "config_hash" not in written["scores"][0]  # said once, above the rows


def test_markdown_and_unknown_formats(tmp_path):
    lines = write_table(_table(), tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("## RANDOM-WEIGHT BACKBONES") and lines[2].startswith("| clip | score |")
    assert set(FORMATS) == {".csv", ".json", ".md"}
    with pytest.raises(ValueError, match=r"t\.txt: a table is written as"):
        write_table(_table(), tmp_path / "t.txt")


LINE_BREAKS = ["a\rb", "a\r\nb", "a\nb", "ends\r", "x,\ry"]


def test_csv_cells_holding_line_breaks_stay_one_cell_for_pandas_and_the_csv_module(tmp_path):
    r"""A video named "a\rb.mp4", an error message over several lines: quoted, so the row stays one row.
    Break tried: rows_to_csv writing with csv's "\n" terminator (a lone "\r" left bare) splits the rows."""
    rows = [{"clip": clip, "score": 1.5, "error": f"cannot decode {clip}"} for clip in LINE_BREAKS]
    path = write_table(Table("scores of run R", RANDOM, rows), tmp_path / "t.csv")
    with open(path, newline="") as handle:
        header, *body = list(csv.reader(handle))
    assert header == ["clip", "score", "error", "random_weights", "config_hash"]
    assert [row[0] for row in body] == LINE_BREAKS and [row[2] for row in body] == [r["error"] for r in rows]
    table = pd.read_csv(path)
    assert table["clip"].tolist() == LINE_BREAKS and table["score"].tolist() == [1.5] * len(rows)
    assert path.read_bytes().startswith(b"clip,score,error,random_weights,config_hash\n\"a\rb\",1.5,")


def test_the_demo_shows_the_counts_and_failed_clips_not_every_clip():
    printed = ("video_id status  T  rgb flow   audio error\n"
               "  clip00   done  2 done done    done      \n"
               "  clip01 failed  0 failed failed failed cannot decode video\n"
               "  clip02   done  2 done done missing      \n"
               "\n2 extracted, 0 already done, 1 failed, 0 left to another running process. Manifest: m.csv\n")
    assert extract_report(printed) == [
        "video_id status  T  rgb flow   audio error",
        "  clip01 failed  0 failed failed failed cannot decode video",
        "2 extracted, 0 already done, 1 failed, 0 left to another running process. Manifest: m.csv",
    ]
    assert extract_report(printed.replace("clip01 failed", "clip01   done")) == [printed.splitlines()[-1]]


# (a CR starting a cell is escaped the same way, escape_csv_cell("\rx") == "'\rx"; not in a file here,
# since Python's csv writer does not quote a CR inside a cell when lines end in \n)
FORMULAS = ['=HYPERLINK("http:x","y")', "=1+2", "+SUM(1,2)", "@cmd", "-2+3", "\tx", "'=quoted"]


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped_and_json_keeps_them_exact(tmp_path):
    """Formula injection: text starting with = + - @ tab or CR gets a leading single quote (a quote the
    escape would otherwise make ambiguous, too); numbers, negative ones included, are left as they are."""
    from manifests.files import escape_csv_cell, unescape_csv_cell

    ids = [*FORMULAS, "plain", "'plain", "-"]
    rows = [{"clip": clip, "score": -1.5, "text": "-2.5"} for clip in ids]
    path = write_table(Table("scores of run R", RANDOM, rows, rows_key="scores"), tmp_path / "t.csv")
    with open(path, newline="") as handle:
        header, *body = list(csv.reader(handle))
    written = {column: [row[i] for row in body] for i, column in enumerate(header)}
    assert written["clip"] == ["'" + c for c in FORMULAS] + ["plain", "'plain", "'-"]
    assert set(written["score"]) == {"-1.5"} and set(written["text"]) == {"-2.5"}  # numbers are not text
    assert [unescape_csv_cell(c) for c in written["clip"]] == ids  # the reader's undo gives the ids back
    assert escape_csv_cell("\rx") == "'\rx" and unescape_csv_cell("'\rx") == "\rx"
    table = write_table(Table("scores of run R", RANDOM, rows, rows_key="scores"), tmp_path / "t.json")
    assert [r["clip"] for r in json.loads(table.read_text())["scores"]] == ids
