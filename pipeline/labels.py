"""Judges' scores: a CSV `video_id,score[,split]`, checked line by line before any training starts.

`split` (optional) is one of train / val / test. `train` never uses test rows; `evaluate` uses only
them when the column is there. Every problem is reported with the file and the line (line 1 is the
header), all of them at once, so a user fixes the file in one pass. Other columns (a judge's notes)
are ignored, and named in one warning line on stderr.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from manifests.cache import DONE, FeatureCache
from manifests.files import unescape_csv_cell

REQUIRED_COLUMNS = ("video_id", "score")
SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # problems listed in one error message before "... and N more"
_warned: set[tuple[Path, tuple[str, ...]]] = set()  # said once per command: reproduce reads a file per seed


class LabelError(ValueError):
    """The labels file, or its match with the feature cache, is wrong; the message names file and lines."""


@dataclass
class Labels:
    path: Path
    scores: dict[str, float]  # video_id -> score, in file order
    lines: dict[str, int]  # video_id -> line number in the file
    splits: dict[str, str] | None = None  # video_id -> train / val / test, when the column exists
    extra_columns: list[str] = field(default_factory=list)

    @property
    def video_ids(self) -> list[str]:
        return list(self.scores)

    def ids_in_split(self, *names: str) -> list[str]:
        if self.splits is None:
            return list(self.scores)
        return [v for v in self.scores if self.splits[v] in names]

    def where(self, video_id: str) -> str:
        return f"{self.path} line {self.lines[video_id]}"


def _raise_all(path: Path, problems: list[str]) -> None:
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    text = "\n".join(f"  {p}" for p in shown) + (f"\n  ... and {more} more" if more else "")
    raise LabelError(f"{path}: {len(problems)} problem(s):\n{text}")


def _read_text(path: Path) -> str:
    """The file as text, or a LabelError naming it: missing, a folder, binary (a video?), UTF-16, not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelError(f"cannot read labels file {path}: {exc.strerror}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LabelError(f"{path} is UTF-16 text (as some spreadsheet programs save it); save it as CSV in UTF-8")
    if b"\x00" in data[:8192]:
        raise LabelError(f"{path} is not a text file (binary content: a video or spreadsheet?); --labels takes "
                         "a CSV file `video_id,score[,split]`")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelError(f"{path} line {line}: byte {data[exc.start]:#04x} is not UTF-8; save the file as CSV "
                         "in UTF-8") from None


def read_labels(path: str | Path) -> Labels:
    """Parse and check a labels CSV: header, ids, numeric finite scores, no duplicates, valid splits.

    Every row is checked for every problem and all of them are reported together. Ids are kept exactly
    as written (spaces included: a video file named " a .mp4" has the id " a "), except for the leading
    single quote with which the project's CSV files escape an id a spreadsheet would run as a formula
    ('=1+2 is the id =1+2: manifests.files.unescape_csv_cell)."""
    path = Path(path).expanduser()
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        raise LabelError(f"{path} is empty; expected a header line `video_id,score[,split]`")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise LabelError(
            f"{path} line 1: header {','.join(header)!r} lacks column(s) {missing}; "
            "expected `video_id,score` and optionally `split`"
        )
    index = {name: header.index(name) for name in header}
    has_split = "split" in index
    scores: dict[str, float] = {}
    lines: dict[str, int] = {}
    first_seen: dict[str, int] = {}  # every id's first line, valid row or not, to find duplicates
    splits: dict[str, str] = {}
    problems: list[str] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines are harmless
        if len(row) != len(header):
            hint = " (a decimal comma? write 7.5, not 7,5, or quote the field)" if len(row) > len(header) else ""
            problems.append(f"line {line}: {len(row)} field(s), the header has {len(header)}{hint}")
            continue
        video_id = unescape_csv_cell(row[index["video_id"]])  # as the project's CSV writers escape it
        text = row[index["score"]].strip()
        found = []
        if not video_id.strip():
            found.append(f"line {line}: empty video_id")
        elif video_id in first_seen:
            found.append(f"line {line}: duplicate video_id {video_id!r} (first on line {first_seen[video_id]})")
        else:
            first_seen[video_id] = line
        try:
            score = float(text)
            if not math.isfinite(score):
                found.append(f"line {line}: score {text!r} of {video_id!r} is not finite")
        except ValueError:
            found.append(f"line {line}: score {text!r} of {video_id!r} is not a number")
        split = row[index["split"]].strip().lower() if has_split else None
        if has_split and split not in SPLITS:
            found.append(f"line {line}: split {split!r} of {video_id!r} is not one of {SPLITS}")
        if found:
            problems += found
            continue
        if has_split:
            splits[video_id] = split
        scores[video_id] = score
        lines[video_id] = line
    if problems:
        _raise_all(path, problems)
    if not scores:
        raise LabelError(f"{path} has a header but no labelled videos")
    extra = [h for h in header if h not in (*REQUIRED_COLUMNS, "split")]
    if extra and (path.resolve(), tuple(extra)) not in _warned:
        _warned.add((path.resolve(), tuple(extra)))
        print(f"warning: {path}: column(s) {', '.join(extra)} ignored (a labels file uses video_id, score "
              "and split)", file=sys.stderr)
    return Labels(path, scores, lines, splits if has_split else None, extra)


def check_against_cache(
    labels: Labels,
    cache: FeatureCache,
    video_ids: list[str] | None = None,
    require_all_labelled: bool = True,
) -> dict[str, list[str]]:
    """Match labelled ids with the cache; returns {video_id: present modalities} for `video_ids`.

    Errors (all listed at once): a labelled id with no record, a failed record, or no modality at all
    ("ids without features"); with `require_all_labelled`, cache videos the file does not mention
    ("features without labels": usually a truncated or wrong labels file).
    """
    wanted = labels.video_ids if video_ids is None else video_ids
    records = {r.video_id: r for r in cache.records()}
    problems = []
    present: dict[str, list[str]] = {}
    for video_id in wanted:
        record = records.get(video_id)
        where = f"line {labels.lines[video_id]}"
        if record is None:
            close = difflib.get_close_matches(video_id, [v for v in records if v not in labels.scores], n=1) or \
                difflib.get_close_matches(video_id, list(records), n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: video {video_id!r} has no features in {cache.root}{guess}")
        elif record.status != DONE:
            problems.append(f"{where}: video {video_id!r} failed extraction ({record.error or 'no reason recorded'})")
        elif not record.present_modalities():
            problems.append(f"{where}: video {video_id!r} has every modality missing in {cache.root}")
        else:
            present[video_id] = [m for m in cache.modalities if m in record.present_modalities()]
    if require_all_labelled:
        unlabelled = sorted(set(records) - set(labels.scores))
        if unlabelled:
            shown = ", ".join(map(repr, unlabelled[:MAX_LISTED])) + (" ..." if len(unlabelled) > MAX_LISTED else "")
            problems.append(
                f"{len(unlabelled)} video(s) in the feature cache {cache.root} have no label ({shown}). Label "
                "them, list held-out videos with split=test, or pass --ignore-unlabelled."
            )
    if problems:
        _raise_all(labels.path, problems)
    return present
