"""Text inputs read once, with one-line errors: the plain-file checks every reader shares (a file, not a
folder; text, not binary; UTF-8), CSV tables (the batch manifest, the cohort table, a prescribed AIF)
and the prescribed AIF. In the core (stdlib and numpy only) so that the files layer and the cohort
statistics read tables the same way.

A table is UTF-8 text (a BOM is allowed), comma, semicolon or tab separated, its first non-empty row a
header naming the columns; every row has the header's number of cells (empty cells are fine, empty
lines are skipped). Rows are numbered from 1 for the first row below the header, as a spreadsheet shows
them below its header; the line number in the file is given too. Plain Python (stdlib) and numpy.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: Column separators a table may use, in order of preference.
DELIMITERS = (",", ";", "\t")
#: Characters that do not occur in text (C0 controls but tab, line feed, form feed and carriage return).
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
#: Largest text file read (bytes): tables and JSON files of this package are far smaller.
MAX_TEXT_BYTES = 256 * 2**20


def check_file(path: str, label: str | None = None) -> None:
    """ValueError unless ``path`` is an existing file (not a folder). ``label`` starts the message
    (default: the path)."""
    label = label or str(path)
    if not os.path.exists(path):
        raise ValueError(f"{label} does not exist - check the path")
    if os.path.isdir(path):
        raise ValueError(f"{label}: is a folder - give a file")
    if not os.path.isfile(path):
        raise ValueError(f"{label}: is not a regular file - give a file")


def read_text(path: str, label: str | None = None, fix: str = "") -> str:
    """The content of a UTF-8 text file (a leading BOM removed). ValueError starting with ``label``
    (default: the path) when it is missing, a folder, unreadable, binary, UTF-16 or not UTF-8; ``fix``
    ends the binary-file message (what to give instead)."""
    label = label or str(path)
    check_file(path, label)
    try:
        if os.path.getsize(path) > MAX_TEXT_BYTES:
            raise ValueError(f"{label}: is larger than {MAX_TEXT_BYTES // 2**20} MB - is it the right file?")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{label}: cannot be read ({exc.strerror or exc}) - check the file's permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{label}: is UTF-16 text - save it as UTF-8 (in Excel: CSV UTF-8)")
    if b"\x00" in data:
        raise ValueError(f"{label}: is a binary file, not text{' - ' + fix if fix else ''}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{label}: is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}; Latin-1 or "
                         "Windows encoding?) - save it as UTF-8 (in Excel: CSV UTF-8)") from None
    bad = _CONTROL.search(text)
    if bad:
        line = text[: bad.start()].count("\n") + 1
        raise ValueError(f"{label}: holds a control character (0x{ord(bad.group()):02x} on line {line}), not text"
                         f"{' - ' + fix if fix else ' - is it the right file?'}")
    return text


@dataclass
class Table:
    """A CSV table: ``columns`` (header names, stripped), ``rows`` ({column: stripped cell}), ``lines``
    (the file's line number of each row), the ``delimiter`` and the ``label`` errors start with."""

    path: str
    label: str
    columns: list
    rows: list
    lines: list
    delimiter: str
    example: str = ""
    _numeric_header: bool = field(default=False, repr=False)

    def where(self, n: int) -> str:
        """'<label> row n (line L)' for the n-th row (1 = the first below the header)."""
        return f"{self.label} row {n} (line {self.lines[n - 1]})"

    def require(self, needed) -> None:
        """ValueError naming the missing columns (or the missing header) unless all of ``needed`` are there."""
        missing = [c for c in needed if c not in self.columns]
        if not missing:
            return
        if self._numeric_header:
            raise ValueError(f"{self.label}: has no header row (the first row is numbers) - the first row must "
                             f"name the columns: {', '.join(needed)}")
        raise ValueError(f"{self.label}: missing column(s) {', '.join(missing)}; the header has "
                         f"{', '.join(self.columns)} (need {', '.join(needed)})")


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", "."))
        return True
    except ValueError:
        return False


def _cells(line: str, delimiter: str) -> list:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return [line]


def sniff_delimiter(lines: list) -> str | None:
    """The delimiter (of :data:`DELIMITERS`) that splits the header (``lines[0]``) into the most columns
    while most of the other lines have that many cells; None when none splits the header."""
    best, best_score = None, None
    for d in DELIMITERS:
        n = len(_cells(lines[0], d))
        if n < 2:
            continue
        sample = lines[1:50]
        agree = sum(len(_cells(s, d)) == n for s in sample) / len(sample) if sample else 1.0
        score = (agree, n)
        if best_score is None or score > best_score:
            best, best_score = d, score
    return best


def read_table(path: str, what: str = "table", example: str = "") -> Table:
    """A CSV table (see the module doc). ValueError starting with '<what> <path>' and naming the fix
    for: a missing file, a folder, a binary or non-UTF-8 file, an empty file, a single column (no
    comma, semicolon or tab in the header), header names empty or twice, and rows with another number of
    cells than the header. ``example`` (a header such as 'time_s,concentration_mM') goes into the fixes."""
    label = f"{what} {path}"
    shown = f", e.g. {example}" if example else ""
    text = read_text(path, label, f"give a CSV table (comma, semicolon or tab separated, a header row{shown})")
    lines = [s for s in text.splitlines() if s.strip()]
    if not lines:
        raise ValueError(f"{label}: is empty - give a CSV table with a header row{shown}")
    delimiter = sniff_delimiter(lines)
    if delimiter is None:
        raise ValueError(f"{label}: has one column ({lines[0][:60]!r}) - separate the columns by commas, "
                         f"semicolons or tabs{shown}")
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
        records = []
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append(([c.strip() for c in cells], reader.line_num))
    except csv.Error as exc:
        raise ValueError(f"{label}: is not a readable CSV table ({exc}) - save it again as CSV{shown}") from None
    if not records:
        raise ValueError(f"{label}: is empty - give a CSV table with a header row{shown}")
    header, _ = records[0]
    numeric = all(_looks_numeric(c) for c in header if c)
    while header and not header[-1] and all(len(c) < len(header) or not c[len(header) - 1] for c, _ in records[1:]):
        header = header[:-1]                               # trailing unnamed, empty columns (spreadsheet exports)
    for i, name in enumerate(header if not numeric else (), start=1):      # no header: the callers say so
        if not name:
            raise ValueError(f"{label}: column {i} of the header has no name - name every column{shown}")
    seen = set()
    for name in header if not numeric else ():
        if name in seen:
            raise ValueError(f"{label}: column {name!r} appears twice in the header - name every column once")
        seen.add(name)
    rows, numbers = [], []
    for n, (cells, line) in enumerate(records[1:], start=1):
        if len(cells) > len(header) and not any(cells[len(header):]):
            cells = cells[: len(header)]                   # trailing empty cells
        if len(cells) != len(header):
            raise ValueError(f"{label} row {n} (line {line}): has {len(cells)} cells, the header {len(header)} - "
                             "give every row one cell per column (quote values that hold the delimiter)")
        rows.append(dict(zip(header, cells)))
        numbers.append(line)
    return Table(str(path), label, header, rows, numbers, delimiter, example, numeric)


# ============================================================================================ the AIF
#: A time column in milliseconds by its header ("time_ms", "t (ms)", "msec").
_MS_HEADER = re.compile(r"(^|[^a-z])(ms|msec|millisec\w*)([^a-z]|$)", re.I)
#: A concentration column in micromolar by its header ("uM", "µM").
_UM_HEADER = re.compile(r"(^|[^a-z])(um|µm|μm|umol\w*)([^a-z]|$)", re.I)
#: Longest AIF accepted (s): longer time columns are taken for milliseconds.
MAX_AIF_DURATION_S = 3600.0
#: Highest plasma/blood concentration accepted (mM); higher ones are taken for micromolar.
MAX_AIF_CONCENTRATION_MM = 100.0
#: Negative concentrations are noise when they are within this fraction of the peak.
AIF_NOISE_FRACTION = 0.1


def _number(table: Table, n: int, column: str, what: str) -> float:
    raw = table.rows[n - 1][column]
    text = raw.replace(",", ".") if table.delimiter != "," and raw.count(",") == 1 else raw   # decimal comma
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{table.where(n)}: {column} = {raw[:40]!r} is not a number - give {what}") from None
    if not math.isfinite(value):
        raise ValueError(f"{table.where(n)}: {column} = {raw[:40]!r} is not a finite number - give {what}")
    return value


def read_aif_csv(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A prescribed arterial input function from a CSV file: two columns, time (s from the first frame) and
    the plasma concentration (mM), under a header such as ``time_s,concentration_mM`` (comma, semicolon or
    tab separated; with semicolons or tabs a decimal comma is accepted). A column named as blood (``cb``,
    ``blood``) is refused: the chain fits plasma curves, cp = cb / (1 - Hct).

    Returns (times t_s in s as in the file, concentrations c_mM in mM, a description). ValueError naming
    the file (and the row and column) for: not two columns, no header, fewer than 3 rows, cells that are
    not numbers, times that do not increase, a time column that looks like milliseconds (header 'ms' or
    longer than an hour), concentrations above 100 mM (micromolar?) or negative beyond noise (below -10 %
    of the peak), and a curve without a positive concentration."""
    example = "time_s,concentration_mM"
    table = read_table(path, "AIF file", example)
    if len(table.columns) != 2:
        raise ValueError(f"{table.label}: has {len(table.columns)} columns ({', '.join(table.columns)}) - give two: "
                         f"time in s and concentration in mM, e.g. {example}")
    if table._numeric_header:
        raise ValueError(f"{table.label}: has no header row (the first row is numbers) - the first row must name the "
                         f"columns, e.g. {example}")
    tcol, ccol = table.columns
    if re.search(r"conc|^c|cp|cb|aif|mm", tcol, re.I) and re.search(r"time|^t($|[^a-z])|sec|^s$", ccol, re.I):
        tcol, ccol = ccol, tcol                                   # concentration first, time second
    if _MS_HEADER.search(tcol):
        raise ValueError(f"{table.label}: the time column {tcol!r} is in ms - give the times in seconds (time_s)")
    if re.search(r"blood|^cb($|[^a-z])|whole", ccol, re.I):
        raise ValueError(f"{table.label}: the column {ccol!r} is a blood concentration - give the plasma "
                         "concentration, cp = cb / (1 - Hct), under a header such as concentration_mM or cp_mM")
    if _UM_HEADER.search(ccol):
        raise ValueError(f"{table.label}: the concentration column {ccol!r} is in µM - give it in mM "
                         "(concentration_mM)")
    n = len(table.rows)
    if n < 3:
        raise ValueError(f"{table.label}: has {n} row(s) - an AIF needs at least 3 time points")
    t = np.array([_number(table, i, tcol, "the time in seconds") for i in range(1, n + 1)])
    c = np.array([_number(table, i, ccol, "the concentration in mM") for i in range(1, n + 1)])
    steps = np.diff(t)
    if np.any(steps <= 0):
        i = int(np.flatnonzero(steps <= 0)[0]) + 2
        raise ValueError(f"{table.where(i)}: time {t[i - 1]:g} s is not after the previous row's {t[i - 2]:g} s - "
                         "the times must increase")
    if t[-1] - t[0] > MAX_AIF_DURATION_S:
        raise ValueError(f"{table.label}: the times span {t[-1] - t[0]:.6g}, more than an hour in seconds - values "
                         "in ms? give seconds")
    peak = float(c.max())
    if peak <= 0:
        raise ValueError(f"{table.label}: no concentration is positive - give the concentration in mM "
                         "(baseline 0)")
    if peak > MAX_AIF_CONCENTRATION_MM:
        i = int(np.argmax(c)) + 1
        raise ValueError(f"{table.where(i)}: concentration {peak:g} is above {MAX_AIF_CONCENTRATION_MM:g} mM - "
                         "values in µM? give mM")
    low = float(c.min())
    if low < -AIF_NOISE_FRACTION * peak:
        i = int(np.argmin(c)) + 1
        raise ValueError(f"{table.where(i)}: concentration {low:g} mM is negative beyond noise (more than "
                         f"{AIF_NOISE_FRACTION:.0%} of the peak {peak:.3g} mM) - give concentrations in mM, "
                         "baseline 0")
    description = (f"prescribed AIF {path} ({n} points, {t[0]:g}-{t[-1]:g} s, peak {peak:.3g} mM)")
    log.info("%s", description)
    return t, c, description
