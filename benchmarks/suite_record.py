"""Run the test suite as the README says (./scripts/test.sh) and record its result on this CPU.

    python benchmarks/suite_record.py            # extra arguments go to scripts/test.sh (pytest)

Appends {commit, date, CPU vendor/family/model/name, AVX-512/AVX512_BF16/AMX flags, cores, passed/
failed/skipped/error counts, failed test ids, wall seconds} to benchmarks/results/suite_runs.json, so
that a test failing on one host only shows which CPU it comes from. pytest's output is passed through.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "suite_runs.json"
OUTCOMES = ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def parse_summary(output: str) -> dict:
    """Counts from pytest's last summary line ("3 failed, 322 passed, 1 skipped in 301.2s") and the ids
    of the failed tests (their "FAILED tests/x.py::name" lines). Raises ValueError without a summary line."""
    lines = [line.strip("= ") for line in output.splitlines()]
    summary = next((line for line in reversed(lines) if re.search(r"\bin [\d.]+s\b", line) and _COUNT.search(line)),
                   None)
    if summary is None:
        raise ValueError("no pytest summary line (\"N passed ... in S s\") in the output")
    counts = {outcome: 0 for outcome in OUTCOMES}
    for number, word in _COUNT.findall(summary):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        if word in counts:
            counts[word] = int(number)
    return {**counts, "failed_tests": _FAILED.findall(output), "summary_line": summary}


def cpu_description() -> dict:
    """Vendor, family, model, name and the SIMD flags that change float results, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"vendor": None, "family": None, "model": None, "name": None, "cores": os.cpu_count(),
                "avx512": None, "avx512_bf16": None, "amx": None}
    first = text.split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id"), "family": fields.get("cpu family"), "model": fields.get("model"),
        "name": fields.get("model name"), "cores": os.cpu_count(),
        "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
    }


def git_commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return found.stdout.strip() + ("+uncommitted changes" if dirty else "")


def folder_mib(folder: Path) -> int | None:
    """Disk use of `folder` in MiB (None when it does not exist)."""
    if not folder.exists():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) // 2**20


def append(entry: dict, path: Path = RECORD) -> None:
    runs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*runs, entry], indent=2) + "\n")


def record_run(command: list[str], shown: str, path: Path = RECORD) -> int:
    """Run `command` (pytest's output passed through), append its result to `path`; its exit code."""
    fresh_venv = not (ROOT / ".venv").exists()  # then the wall time includes creating and installing it
    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    code = process.wait()
    wall = time.monotonic() - started
    try:
        result = parse_summary("".join(lines))
    except ValueError as error:
        print(f"suite_record: {error}; nothing recorded (exit code {code})", file=sys.stderr)
        return code or 1
    append({"commit": git_commit(), "date": date, "cpu": cpu_description(), "command": shown, "exit_code": code,
            **result, "wall_seconds": round(wall, 1), "fresh_venv": fresh_venv, "venv_mib": folder_mib(ROOT / ".venv")},
           path)
    print(f"suite_record: appended to {path}")
    return code


def main(argv: list[str]) -> int:
    return record_run([str(ROOT / "scripts" / "test.sh"), *argv], " ".join(["scripts/test.sh", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
