"""Seeded fuzzing of file readers.

- Mutators: generic, seeded edits of a file's bytes (bit flips, byte runs, truncation, chunk
  duplication, deletion and splicing, interesting integers at header offsets, edits inside gzip streams)
  and of its text header (lines deleted, duplicated or cut, numbers edited - huge, negative, NaN - values
  of another type, non-UTF-8 bytes, delimiters swapped), and structural cases (an empty file, random
  bytes, a folder where a file is expected, a companion file missing).
- :func:`run`: calls ``target(path)`` on every mutated file in a worker process with a per-case timeout
  and records every exception that is not a ValueError (type, message, the last frame of the traceback,
  the case), hangs (the worker is killed and restarted), crashes of the worker, ValueError messages that
  are not one line naming the input, and inputs the reader changed.
- The seeds of this package's readers, written as scanners, Slicer and this package write them, and the
  loaders to fuzz (:data:`LOADERS`), shared by ``Testing/test_fuzz.py`` and ``benchmarks/fuzz_loaders.py``.

Everything is reproducible from the seed: the same ``seed`` gives the same cases.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import time
import traceback
import zlib
from dataclasses import dataclass, field

#: Stands for "a folder instead of this file" in a mutated case.
DIRECTORY = object()
#: Stands for "this companion file left out".
MISSING = object()

INTERESTING_TEXT = ["0", "-1", "1", "-0", "2147483648", "-2147483649", "4294967296", "18446744073709551616",
                    "99999999999999999999999999", "1e308", "1e999", "-1e999", "nan", "NaN", "inf", "-inf", "0.5",
                    "1.0e-300", "", " ", "1,5", "0x10", "+7", "1" * 5000]
ODD_VALUES = ["[]", "{}", '"x"', "null", "true", "false", "[1, 2]", '{"a": 1}', "1e999", "-1", "NaN", '"1"', "[[[[[",
              '"\\u0000"', "0", '""']
NON_UTF8 = [b"\xe9", b"\xff", b"\xc3(", b"\x80\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff",
            b"caf\xe9", b"\x00"]
INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 16, 255, 256, 348, 352, 540, 0x7FFF, -0x8000, 0xFFFF, 0x7FFFFFFF, -0x80000000,
                    0xFFFFFFFF]
INTERESTING_FLOATS = [0.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), 1e-30, 352.0, 1e10]


# ============================================================================================ mutators
def _text_end(data: bytes) -> int:
    """Where a file's text part ends: after the blank line ending a text header (NRRD), the whole file
    when it is text (CSV, JSON), else 0 (a binary header such as NIfTI's)."""
    def texty(b: bytes) -> bool:
        if not b:
            return False
        printable = sum(1 for x in b[:65536] if x in (9, 10, 13) or 32 <= x < 127 or x >= 128)
        return printable >= 0.97 * min(len(b), 65536)
    m = re.search(rb"\n\r?\n", data[: 1 << 20])
    if m and texty(data[: m.start()]):
        return m.end()
    return len(data) if texty(data) else 0


def _span(rng: random.Random, n: int, max_len: int = 64):
    a = rng.randrange(n)
    return a, min(n, a + rng.randint(1, max_len))


def bit_flips(rng, data, others):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def byte_run(rng, data, others):
    a, e = _span(rng, len(data))
    fill = rng.choice([b"\x00", b"\xff", b" ", bytes([rng.randrange(256)]), None])
    run = bytes(rng.randrange(256) for _ in range(e - a)) if fill is None else fill * (e - a)
    return data[:a] + run + data[e:]


def truncate(rng, data, others):
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    return data[: max(0, len(data) - rng.randint(1, 64))]                     # a few bytes short


def extend(rng, data, others):
    extra = rng.choice([b"\x00" * rng.randint(1, 64), bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
                        data[-rng.randint(1, min(len(data), 4096)):], b"\n"])
    return data + extra


def duplicate_chunk(rng, data, others):
    a, e = _span(rng, len(data), 4096)
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[a:e] + data[at:]


def delete_chunk(rng, data, others):
    a, e = _span(rng, len(data), 4096)
    return data[:a] + data[e:]


def splice(rng, data, others):
    other = rng.choice(others) if others else data
    if not other:
        return data
    a = rng.randrange(len(data))
    b = rng.randrange(len(other))
    if rng.random() < 0.5:
        return data[:a] + other[b:]
    return data[:a] + other[b: b + rng.randint(1, 4096)] + data[a:]


def interesting_number(rng, data, others):
    """An interesting int16/int32/int64/float32/float64 written at an offset (mostly in the first 600
    bytes, where binary headers are)."""
    b = bytearray(data)
    limit = min(len(b), 600) if rng.random() < 0.8 else len(b)
    import struct
    fmt = rng.choice(["<h", ">h", "<i", ">i", "<q", "<f", ">f", "<d"])
    size = struct.calcsize(fmt)
    if limit < size:
        return data
    at = rng.randrange(0, limit - size + 1)
    if rng.random() < 0.7:
        at -= at % size
    if fmt[-1] in "fd":
        value = struct.pack(fmt, rng.choice(INTERESTING_FLOATS))
    else:
        bits = 8 * size
        v = rng.choice(INTERESTING_INTS) % (1 << bits)
        v = v - (1 << bits) if v >= 1 << (bits - 1) else v
        value = struct.pack(fmt, v)
    b[at: at + size] = value
    return bytes(b)


def _lines(rng, data):
    end = _text_end(data)
    head, rest = data[:end], data[end:]
    return head.split(b"\n"), rest


def _join(lines, rest):
    return b"\n".join(lines) + rest


def delete_line(rng, data, others):
    lines, rest = _lines(rng, data)
    if len(lines) > 1:
        del lines[rng.randrange(len(lines))]
    return _join(lines, rest)


def duplicate_line(rng, data, others):
    lines, rest = _lines(rng, data)
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    return _join(lines, rest)


def swap_lines(rng, data, others):
    lines, rest = _lines(rng, data)
    if len(lines) > 2:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    return _join(lines, rest)


def cut_line(rng, data, others):
    lines, rest = _lines(rng, data)
    i = rng.randrange(len(lines))
    if lines[i]:
        lines[i] = lines[i][: rng.randrange(len(lines[i]))]
    return _join(lines, rest)


_NUMBER = re.compile(rb"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")


def edit_number(rng, data, others):
    """A number of the text part replaced: an interesting value, negated, scaled, off by one, huge."""
    end = _text_end(data)
    found = list(_NUMBER.finditer(data[:end]))
    if not found:
        return data
    m = rng.choice(found)
    old = m.group().decode()
    choice = rng.random()
    if choice < 0.45:
        new = rng.choice(INTERESTING_TEXT)
    elif choice < 0.6:
        new = old[1:] if old.startswith("-") else "-" + old                     # negative sizes, dims
    elif choice < 0.75:
        new = old + "0" * rng.randint(1, 30)                                    # huge
    elif choice < 0.9:
        try:
            new = str(int(float(old)) + rng.choice([-1, 1]))
        except (ValueError, OverflowError):
            new = "0"
    else:
        new = f"{float(old) * rng.choice([0.001, 1000.0, -1.0]):g}" if old.strip("+-") else "0"
    return data[: m.start()] + new.encode() + data[m.end():]


_TOKEN = re.compile(rb'"[^"\n]*"|[-+]?\d+(\.\d*)?([eE][-+]?\d+)?|\[[^\[\]\n]*\]')


def odd_value(rng, data, others):
    """A value of the text part (a quoted string, a number, a [...] list) replaced by one of another type."""
    end = _text_end(data)
    found = list(_TOKEN.finditer(data[:end]))
    if not found:
        return data
    m = rng.choice(found)
    return data[: m.start()] + rng.choice(ODD_VALUES).encode() + data[m.end():]


def non_utf8(rng, data, others):
    """Bytes that are not UTF-8 inserted in (or replacing a character of) the text part."""
    end = _text_end(data) or len(data)
    at = rng.randrange(end)
    bad = rng.choice(NON_UTF8)
    return data[:at] + bad + data[at + (rng.random() < 0.5):]


def swap_delimiter(rng, data, others):
    end = _text_end(data)
    marks = [m.start() for m in re.finditer(rb"[,;\t:=]", data[:end])]
    if not marks:
        return data
    at = rng.choice(marks)
    return data[:at] + rng.choice([b",", b";", b"\t", b":", b" ", b"", b'"', b",,"]) + data[at + 1:]


def inside_gzip(rng, data, others):
    """A gzip stream of the file (a .nii.gz, a NRRD's gzip data) decompressed, mutated and compressed
    again, so the mutation reaches what the reader sees after decompressing."""
    at = data.find(b"\x1f\x8b\x08")
    if at < 0:
        return data
    d = zlib.decompressobj(31)
    try:
        inner = d.decompress(data[at:], 64 * 2**20)
    except zlib.error:
        return data
    tail = d.unused_data
    op = rng.choice([truncate, extend, bit_flips, byte_run, duplicate_chunk, delete_chunk, interesting_number,
                     edit_number, non_utf8, delete_line, odd_value])
    inner = op(rng, inner, others) if inner else inner
    return data[:at] + gzip.compress(inner, mtime=0) + tail


BINARY_MUTATORS = [(bit_flips, 3), (byte_run, 2), (truncate, 3), (extend, 2), (duplicate_chunk, 1), (delete_chunk, 1),
                   (splice, 1), (interesting_number, 3)]
TEXT_MUTATORS = [(delete_line, 2), (duplicate_line, 2), (swap_lines, 1), (cut_line, 1), (edit_number, 5),
                 (odd_value, 3), (non_utf8, 2), (swap_delimiter, 2)]


def mutate(rng: random.Random, data: bytes, others: list) -> tuple[bytes, list]:
    """``data`` with 1-3 mutations chosen by weight (text mutators where the file has a text part, edits
    inside gzip where it has a gzip stream); returns (the mutated bytes, the mutators' names)."""
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        if not data:
            break
        pool = list(BINARY_MUTATORS)
        if _text_end(data):
            pool += [(m, 2 * w) for m, w in TEXT_MUTATORS]
        if b"\x1f\x8b\x08" in data:
            pool.append((inside_gzip, 6))
        op = rng.choices([m for m, _ in pool], weights=[w for _, w in pool])[0]
        data = op(rng, data, others)
        names.append(op.__name__)
    return data, names


def mutate_case(rng: random.Random, files: dict, others: list) -> tuple[dict, list]:
    """One case from a seed's files ({name: bytes}, the first the reader is given): mostly the first file
    mutated, sometimes a companion; now and then a structural case (empty, random bytes, a folder, a
    companion left out)."""
    files = dict(files)
    names = list(files)
    r = rng.random()
    if r < 0.02:
        files[names[0]] = DIRECTORY
        return files, ["directory"]
    if r < 0.04:
        files[names[0]] = b""
        return files, ["empty"]
    if r < 0.06:
        files[names[0]] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
        return files, ["random bytes"]
    if len(names) > 1 and r < 0.09:
        victim = rng.choice(names[1:])
        files[victim] = MISSING if rng.random() < 0.5 else DIRECTORY
        return files, [f"{victim} {'missing' if files[victim] is MISSING else 'a folder'}"]
    victim = names[0] if len(names) == 1 or rng.random() < 0.7 else rng.choice(names[1:])
    data, ops = mutate(rng, files[victim], others)
    files[victim] = data
    return files, [f"{victim}: {op}" for op in ops]


# ============================================================================================ runner
@dataclass
class Finding:
    """What went wrong on one case. ``kind``: exception | hang | crash | message | modified."""

    kind: str
    type: str
    message: str
    place: str
    case: str
    mutations: list


@dataclass
class Report:
    target: str
    cases: int = 0
    ok: int = 0
    refused: int = 0
    seconds: float = 0.0
    findings: list = field(default_factory=list)
    seed_failures: list = field(default_factory=list)
    refusals: collections.Counter = field(default_factory=collections.Counter)   # message pattern -> count

    def of(self, kind: str) -> list:
        return [f for f in self.findings if f.kind == kind]

    @property
    def uncaught(self) -> list:
        return self.of("exception")

    @property
    def hangs(self) -> list:
        return self.of("hang")

    @property
    def crashes(self) -> list:
        return self.of("crash")

    @property
    def bad_messages(self) -> list:
        return self.of("message")

    def places(self) -> collections.Counter:
        """(kind, exception type, place) -> count."""
        return collections.Counter((f.kind, f.type, f.place) for f in self.findings)

    def lines(self) -> list:
        out = [f"{self.target}: {self.cases} inputs in {self.seconds:.1f} s - {self.ok} read, {self.refused} refused "
               f"with a ValueError, {len(self.uncaught)} uncaught exceptions, {len(self.hangs)} hangs, "
               f"{len(self.crashes)} crashes, {len(self.bad_messages)} bad messages, {len(self.of('modified'))} "
               "inputs changed"]
        examples = {}
        for f in self.findings:
            examples.setdefault((f.kind, f.type, f.place), f)
        for (kind, typ, place), n in self.places().most_common():
            ex = examples[(kind, typ, place)]
            out.append(f"  {n:5d} x {kind} {typ} at {place}: {ex.message[:150]!r} (e.g. {ex.case}: "
                       f"{', '.join(ex.mutations)})")
        for s in self.seed_failures:
            out.append(f"  seed failed: {s}")
        return out


def _limit_memory(mb: int | None) -> None:
    if not mb:
        return
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mb * 2**20, mb * 2**20))
    except (ImportError, ValueError, OSError):
        pass


def _worker(conn, target, memory_mb) -> None:
    """Run ``target(path)`` for each path received; send back what happened."""
    import logging
    import warnings
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:                                                # ITK's and niftilib's warnings go to fd 2
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:
        pass
    _limit_memory(memory_mb)
    while True:
        try:
            path = conn.recv()
        except EOFError:
            return
        if path is None:
            return
        try:
            target(path)
            conn.send(("ok", "", "", ""))
        except ValueError as exc:
            conn.send(("refused", type(exc).__name__, str(exc), ""))
        except BaseException as exc:                    # everything else is a finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            last = frames[-1] if frames else None
            place = f"{os.path.basename(last.filename)}:{last.lineno} {last.name}" if last else "?"
            ours = [f for f in frames if "DCEPerfusionLib" in f.filename]
            if ours and ours[-1] is not last:
                place += f" (from {os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name})"
            conn.send(("exception", type(exc).__name__, str(exc)[:400], place))


class _Worker:
    """A worker process (spawned: no state shared with the caller) that can be killed and restarted."""

    def __init__(self, target, memory_mb):
        self.target, self.memory_mb = target, memory_mb
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.target, self.memory_mb), daemon=True)
        self.proc.start()
        child.close()

    def call(self, path: str, timeout_s: float):
        """("ok" | "refused" | "exception" | "hang" | "crash", type, message, place)."""
        self.conn.send(path)
        if not self.conn.poll(timeout_s):
            self.restart()
            return ("hang", "timeout", f"no answer after {timeout_s:g} s", "")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.restart()
            return ("crash", f"exit code {code}", "the worker process died", "")

    def restart(self):
        self.stop(kill=True)
        self.start()

    def stop(self, kill: bool = False):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
        self.proc = None


def _write_case(folder: str, files: dict) -> dict:
    os.makedirs(folder, exist_ok=True)
    digests = {}
    for name, data in files.items():
        path = os.path.join(folder, name)
        if data is MISSING:
            continue
        if data is DIRECTORY:
            os.makedirs(path, exist_ok=True)
            continue
        with open(path, "wb") as f:
            f.write(data)
        digests[name] = hashlib.sha1(data).hexdigest()
    return digests


def _changed(folder: str, digests: dict) -> list:
    out = []
    for name, digest in digests.items():
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                if hashlib.sha1(f.read()).hexdigest() != digest:
                    out.append(name)
        except OSError:
            out.append(name)
    return out


def _names_input(message: str, folder: str) -> bool:
    return folder in message


def run(target, seeds: dict, n_cases: int, seed: int, tmp_dir: str, timeout_s: float = 30.0, name: str = "",
        keep: int = 20, memory_mb: int | None = 4096, check_messages: bool = True) -> Report:
    """Fuzz ``target`` (a module-level function path -> anything; ValueError is the expected refusal).

    ``seeds``: {name: bytes} or {name: {file name: bytes, ...}} (the first file is the one ``target`` is
    given, the others are its companions, e.g. a JSON sidecar). Every seed is first read unchanged (a
    failure is listed in ``seed_failures``); then ``n_cases`` cases, drawn from ``seed``, each in its own
    folder under ``tmp_dir`` (kept for the first ``keep`` findings, else removed). Each case runs in a
    worker process with ``timeout_s`` (a hang kills and restarts the worker) and an address-space limit
    of ``memory_mb``. Recorded: exceptions that are not ValueError, hangs, crashes, ValueError messages
    that are not one line naming the input's folder (``check_messages``), inputs changed by the reader."""
    rng = random.Random(seed)
    groups = {k: (v if isinstance(v, dict) else {k: v}) for k, v in seeds.items()}
    others = [data for g in groups.values() for data in g.values()]
    report = Report(name or getattr(target, "__name__", str(target)))
    os.makedirs(tmp_dir, exist_ok=True)
    worker = _Worker(target, memory_mb)
    t0 = time.perf_counter()
    kept = 0
    try:
        for gname, files in groups.items():                      # the seeds themselves must read
            folder = os.path.join(tmp_dir, f"seed_{re.sub(r'[^A-Za-z0-9_.-]', '_', gname)}")
            _write_case(folder, files)
            status, typ, msg, place = worker.call(os.path.join(folder, next(iter(files))), max(timeout_s, 120.0))
            if status != "ok":
                report.seed_failures.append(f"{gname}: {status} {typ} {msg[:200]} {place}")
            shutil.rmtree(folder, ignore_errors=True)
        for i in range(n_cases):
            gname = rng.choice(sorted(groups))
            files, ops = mutate_case(rng, groups[gname], others)
            case = f"c{i:06d}"
            folder = os.path.join(tmp_dir, case)
            digests = _write_case(folder, files)
            path = os.path.join(folder, next(iter(files)))
            status, typ, msg, place = worker.call(path, timeout_s)
            report.cases += 1
            found = []
            if status == "ok":
                report.ok += 1
            elif status == "refused":
                report.refused += 1
                pattern = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", msg.replace(folder + os.sep, "").replace(folder, ""))
                report.refusals[re.sub(r"'[^']*'", "'…'", pattern)[:110]] += 1
                if typ != "ValueError":                    # UnicodeDecodeError, JSONDecodeError: not our message
                    found.append(Finding("message", f"{typ} (a ValueError)", msg, "(message)", case, ops))
                elif check_messages and ("\n" in msg.strip() or not _names_input(msg, folder)):
                    found.append(Finding("message", "ValueError", msg, "(message)", case, ops))
            else:
                kind = {"exception": "exception", "hang": "hang", "crash": "crash"}[status]
                found.append(Finding(kind, typ, msg, place, case, ops))
            changed = _changed(folder, digests)
            if changed:
                found.append(Finding("modified", "input changed", ", ".join(changed), "", case, ops))
            for f in found:
                f.case = f"{gname}/{case}"
            report.findings += found
            if found and kept < keep:
                kept += 1
            else:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        worker.stop()
        report.seconds = time.perf_counter() - t0
    return report


# ============================================================================================ seeds
NRRD_INTRO = "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n"
SHAPE = (4, 5, 6)                           # K, J, I
T_S = [0.0, 4.5, 9.0, 13.5, 18.0, 22.5, 27.0, 31.5]


def _matrix():
    import numpy as np
    m = np.diag([0.8, 0.9, 3.0, 1.0])
    m[:3, 3] = [-12.0, 30.0, -7.5]
    return m


def _signal(seed=0, dtype="int16"):
    import numpy as np
    return np.random.default_rng(seed).integers(50, 900, SHAPE + (len(T_S),)).astype(dtype)


def _written(write, suffix: str, *args, **kwargs) -> bytes:
    """The bytes a writer of this package produces."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f" + suffix)
        write(path, *args, **kwargs)
        with open(path, "rb") as f:
            return f.read()


def slicer_dce_nrrd(encoding: str = "raw") -> bytes:
    """A 4D NRRD as Slicer saves a MultiVolume (DICOM import of a dynamic series): short, LPS, frames on
    the first axis, the MultiVolume keys with frame labels in ms."""
    sig = _signal(1)
    data = sig.tobytes()
    labels = ",".join(f"{1000 * t:g}" for t in T_S)
    header = (f"{NRRD_INTRO}"
              "type: short\ndimension: 4\nspace: left-posterior-superior\n"
              f"sizes: {len(T_S)} {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
              "space directions: none (-0.8,0,0) (0,-0.9,0) (0,0,3)\nkinds: list domain domain domain\n"
              f"endian: little\nencoding: {encoding}\nspace origin: (12,-30,-7.5)\n"
              "measurement frame: (1,0,0) (0,1,0) (0,0,1)\n"
              "MultiVolume.DICOM.EchoTime:=1.23\nMultiVolume.DICOM.FlipAngle:=15\n"
              "MultiVolume.DICOM.RepetitionTime:=4.1\nMultiVolume.FrameIdentifyingDICOMTagName:=AcquisitionTime\n"
              f"MultiVolume.FrameIdentifyingDICOMTagUnits:=ms\nMultiVolume.FrameLabels:={labels}\n"
              f"MultiVolume.NumberOfFrames:={len(T_S)}\n\n")
    return header.encode() + (gzip.compress(data, mtime=0) if encoding == "gzip" else data)


def slicer_volume_nrrd() -> bytes:
    """A 3D anatomy volume as Slicer saves a scalar volume: short, raw, LPS."""
    data = _signal(4)[..., 0].tobytes()
    header = (f"{NRRD_INTRO}"
              "type: short\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
              "space directions: (-0.8,0,0) (0,-0.9,0) (0,0,3)\nkinds: domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (12,-30,-7.5)\n\n")
    return header.encode() + data


def slicer_seg_nrrd() -> bytes:
    """A .seg.nrrd as Slicer 5 saves two overlapping segments: two layers (4D, list axis first), gzip,
    the Segmentation_ and SegmentN_ keys."""
    import numpy as np
    layers = np.zeros((2,) + SHAPE, np.uint8)
    layers[0, 1:3, 1:4, 1:5] = 1
    layers[1, 2:4, 2:5, 3:6] = 1
    layers[0, 0, 4, 5] = 2
    data = np.moveaxis(layers, 0, -1).tobytes()               # (K, J, I, layer): the list axis fastest
    extent = f"0 {SHAPE[2] - 1} 0 {SHAPE[1] - 1} 0 {SHAPE[0] - 1}"
    keys = []
    for i, (name, layer, value, colour) in enumerate((("lesion", 0, 1, "0.5 0.68 0.5"), ("aorta", 1, 1, "0.9 0.2 0.2"),
                                                      ("L2 metastasis", 0, 2, "0.2 0.6 0.9"))):
        keys += [f"Segment{i}_Color:={colour}", f"Segment{i}_ColorAutoGenerated:=1", f"Segment{i}_Extent:={extent}",
                 f"Segment{i}_ID:=Segment_{i + 1}", f"Segment{i}_LabelValue:={value}", f"Segment{i}_Layer:={layer}",
                 f"Segment{i}_Name:={name}", f"Segment{i}_NameAutoGenerated:=0",
                 f"Segment{i}_Tags:=Segmentation.Status:inprogress|TerminologyEntry:Segmentation category and type - "
                 "3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM "
                 "master list~^^~^^|"]
    header = (f"{NRRD_INTRO}"
              "type: unsigned char\ndimension: 4\nspace: left-posterior-superior\n"
              f"sizes: 2 {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
              "space directions: none (-0.8,0,0) (0,-0.9,0) (0,0,3)\nkinds: list domain domain domain\n"
              "encoding: gzip\nspace origin: (12,-30,-7.5)\n" + "\n".join(keys) + "\n"
              "Segmentation_ContainedRepresentationNames:=Binary labelmap|Closed surface|\n"
              "Segmentation_ConversionParameters:=Collapse labelmaps|1|Merge the labelmaps into as few shared "
              "labelmaps as possible 1 = created labelmaps will be shared if possible without overwriting each "
              "other.&Compute surface normals|1|Compute surface normals. 1 (default) = surface normals are "
              "computed. 0 = surface normals are not computed (slightly faster but produces less smooth surface "
              "display).\nSegmentation_MasterRepresentation:=Binary labelmap\n"
              "Segmentation_ReferenceImageExtentOffset:=0 0 0\n\n")
    return header.encode() + gzip.compress(data, mtime=0)


def dcm2niix_sidecar(times=True) -> bytes:
    """A BIDS JSON sidecar as dcm2niix writes it for a dynamic series."""
    meta = {"Modality": "MR", "MagneticFieldStrength": 3, "ImagingFrequency": 123.2, "Manufacturer": "Siemens",
            "ManufacturersModelName": "Skyra", "BodyPartExamined": "SPINE", "PatientPosition": "HFS",
            "SoftwareVersions": "syngo MR E11", "MRAcquisitionType": "3D", "SeriesDescription": "t1_vibe_dyn",
            "ProtocolName": "t1_vibe_dyn", "ScanningSequence": "GR", "SequenceVariant": "SP\\SS",
            "ScanOptions": "FS", "SliceThickness": 3, "EchoTime": 0.00123, "RepetitionTime": 0.0041,
            "FlipAngle": 15, "PartialFourier": 1, "BaseResolution": 256, "ShimSetting": [1, 2, 3],
            "TxRefAmp": 250.1, "PhaseResolution": 1, "ReceiveCoilName": "Spine", "PulseSequenceDetails": "%SiemensSeq%",
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "AcquisitionTime": "10:15:00.000000",
            "AcquisitionNumber": 1, "ConversionSoftware": "dcm2niix", "ConversionSoftwareVersion": "v1.0.20220720"}
    if times:
        meta["VolumeTiming"] = [30.0 + t for t in T_S]
    return json.dumps(meta, indent="\t").encode()


def _nifti_4d(dtype="int16", compressed=True) -> bytes:
    import numpy as np
    import SimpleITK as sitk
    sig = _signal(2, dtype)
    img = sitk.GetImageFromArray(np.moveaxis(sig, -1, 0), isVector=False)
    img.SetSpacing([0.8, 0.9, 3.0, 4.5])
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dce.nii.gz" if compressed else "dce.nii")
        sitk.WriteImage(img, path)
        with open(path, "rb") as f:
            return f.read()


def _labels():
    import numpy as np
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:4, 1:5] = 1
    lab[3, 2:5, 3:6] = 2
    return lab


def _csv(rows: list, delimiter: str = ",", bom: bool = False, crlf: bool = False) -> bytes:
    out = io.StringIO()
    import csv
    w = csv.writer(out, delimiter=delimiter, lineterminator="\r\n" if crlf else "\n")
    for r in rows:
        w.writerow(r)
    return ("\ufeff" if bom else "").encode() + out.getvalue().encode()


def seeds_for(loader: str) -> dict:
    """The seed files of a loader of :data:`LOADERS`."""
    import numpy as np
    from DCEPerfusionLib.files import images, series
    if loader == "read_dce_nrrd":
        return {"slicer_raw.nrrd": slicer_dce_nrrd("raw"), "slicer_gzip.nrrd": slicer_dce_nrrd("gzip"),
                "written.nrrd": _written(series.write_dce_nrrd, ".nrrd", _signal(3, "float32"), T_S, _matrix(),
                                         0.0039, 12.0)}
    if loader == "read_dce_nifti":
        return {"gz": {"dce.nii.gz": _nifti_4d(), "dce.json": dcm2niix_sidecar()},
                "raw": {"dce.nii": _nifti_4d("float32", compressed=False), "dce.json": dcm2niix_sidecar()}}
    if loader == "read_segmentation":
        masks = {"a": _labels() == 1, "b": np.zeros(SHAPE, bool)}
        masks["b"][1:4, 2:5, 2:4] = True
        return {"slicer.seg.nrrd": slicer_seg_nrrd(),
                "written.seg.nrrd": _written(images.write_segmentation, ".seg.nrrd", masks, _matrix()),
                "labels.nrrd": _written(images.write_volume, ".nrrd", _labels(), _matrix()),
                "labels.nii.gz": _written(images.write_volume, ".nii.gz", _labels(), _matrix())}
    if loader == "read_volume":
        t1 = np.random.default_rng(5).uniform(0.3, 2.5, SHAPE).astype(np.float32)
        return {"t1.nrrd": _written(images.write_volume, ".nrrd", t1, _matrix()),
                "t1.nii.gz": _written(images.write_volume, ".nii.gz", t1, _matrix()),
                "anatomy.nrrd": slicer_volume_nrrd()}
    if loader == "read_aif_csv":
        t = np.arange(12) * 4.5
        c = np.where(t < 10, 0.0, 6.0 * np.exp(-(t - 10) / 20.0))
        c[1] = -0.02
        return {"aif.csv": _csv([["time_s", "concentration_mM"]] + [[f"{a:g}", f"{b:.4f}"] for a, b in zip(t, c)]),
                "aif_excel.csv": _csv([["time_s", "concentration_mM"]] + [[f"{a:g}".replace(".", ","),
                                      f"{b:.4f}".replace(".", ",")] for a, b in zip(t, c)], ";", bom=True, crlf=True),
                "aif.tsv": _csv([["t (s)", "cp (mM)"]] + [[f"{a:g}", f"{b:.4f}"] for a, b in zip(t, c)], "\t")}
    if loader == "read_manifest":
        rows = [["patient", "lesion", "timepoint", "dce", "segmentation", "outcome"]]
        for p in ("P1", "P2"):
            for tp in ("baseline", "follow-up"):
                for lesion, outcome in (("L2 metastasis", "success"), ("L3", "failure")):
                    rows.append([p, lesion, tp, f"{p}/{tp}/dce.nrrd", f"{p}/{tp}/lesions.seg.nrrd", outcome])
        with_t1 = [r + (["t1"] if i == 0 else [f"{r[0]}/{r[2]}/t1.nrrd"]) for i, r in enumerate(rows)]
        return {"manifest.csv": _csv(rows), "manifest_excel.csv": _csv(with_t1, ";", bom=True, crlf=True)}
    if loader == "read_cohort_csv":
        from DCEPerfusionLib.core import cohort
        rows = cohort.synthetic_cohort(n_success=6, n_failure=4)
        table = [list(rows[0])] + [list(r.values()) for r in rows]
        return {"cohort.csv": _csv(table), "cohort_excel.csv": _csv(table, ";", bom=True, crlf=True)}
    if loader == "read_summary":
        from DCEPerfusionLib.core.regionstats import STAT_NAMES
        stats = [{"segment": s, "map": m, "unit": u, "voxel_count": 40, "volume_cm3": 0.0864,
                  "excluded_voxel_count": 2, **{k: (None if s == "L3" and k == "stdev" else 0.05 + 0.01 * j)
                                                for j, k in enumerate(STAT_NAMES)}}
                 for s in ("L2 metastasis", "L3") for m, u in (("vp", "1"), ("ktrans", "1/min"))]
        summary = {"source": "/data/P1/baseline/dce.nrrd", "time_source": "MultiVolume.FrameLabels (ms)",
                   "frame_times_s": T_S, "aif": "population parker", "cp_mM": [0.0] * len(T_S),
                   "model": "extended_tofts", "method": "linear", "status_counts": {"ok": 100},
                   "statistics": stats, "provenance": {"t10": "blood 1.6 s"}, "warnings": [],
                   "options": {"model": "extended_tofts"}, "inputs": None, "timings_s": {"total_s": 1.5}}
        return {"summary.json": json.dumps(summary, indent=2).encode()}
    raise KeyError(loader)


# ============================================================================================ loaders
def _finite(x) -> bool:
    import numpy as np
    return bool(np.all(np.isfinite(np.asarray(x, dtype=float))))


def load_dce(path: str):
    """read_dce, and what a series must be: 4D float32 signal, one increasing finite time per frame from
    0, a finite matrix, TR/flip angle/field strength positive finite or None."""
    import numpy as np
    from DCEPerfusionLib.files import series
    s = series.read_dce(path)
    assert s.signal.ndim == 4 and s.signal.dtype == np.float32, s.signal.shape
    assert s.t_s.shape == (s.signal.shape[-1],) and s.t_s[0] == 0 and np.all(np.diff(s.t_s) > 0), s.t_s
    assert _finite(s.ijk_to_ras) and abs(np.linalg.det(s.ijk_to_ras[:3, :3])) > 0
    for v in (s.tr_s, s.flip_angle_deg, s.field_strength_t):
        assert v is None or (np.isfinite(v) and v > 0), v
    return s


def load_segmentation(path: str):
    """read_segmentation, and what it must give: named 3D bool masks of one shape, a finite matrix."""
    import numpy as np
    from DCEPerfusionLib.files import images
    masks, m = images.read_segmentation(path)
    shapes = {v.shape for v in masks.values()}
    assert masks and len(shapes) == 1 and len(next(iter(shapes))) == 3, shapes
    assert all(v.dtype == bool for v in masks.values()) and all(isinstance(k, str) and k for k in masks)
    assert _finite(m) and abs(np.linalg.det(m[:3, :3])) > 0
    return masks


def load_volume(path: str):
    import numpy as np
    from DCEPerfusionLib.files import images
    arr, m = images.read_volume(path)
    assert arr.ndim == 3 and _finite(m) and abs(np.linalg.det(m[:3, :3])) > 0
    return arr


def load_aif(path: str):
    import numpy as np
    from DCEPerfusionLib.core import tables
    t, c, description = tables.read_aif_csv(path)
    assert t.shape == c.shape and t.size >= 3 and np.all(np.diff(t) > 0) and _finite(t) and _finite(c)
    assert isinstance(description, str)
    return t, c


def load_manifest(path: str):
    from DCEPerfusionLib.apps import batch
    jobs, rows = batch.read_manifest(path, os.path.join(os.path.dirname(path), "out"))
    assert jobs and rows and all(j.lesions and j.dce for j in jobs)
    return jobs


def load_cohort(path: str):
    from DCEPerfusionLib.core import cohort
    c = cohort.read_cohort_csv(path)
    assert c.n_success > 0 and c.n_failure > 0 and len(c.lesion_ids) == len(c.failure)
    return c


def load_summary(path: str):
    from DCEPerfusionLib.files import exam
    lesions = exam.read_exam_lesions(path)
    for r in lesions.statistics:
        assert isinstance(r.segment, str) and isinstance(r.voxel_count, int)
    return lesions


#: Loader name -> the function fuzzed (each gets the seeds of :func:`seeds_for` under the same name).
LOADERS = {"read_dce_nrrd": load_dce, "read_dce_nifti": load_dce, "read_segmentation": load_segmentation,
           "read_volume": load_volume, "read_aif_csv": load_aif, "read_manifest": load_manifest,
           "read_cohort_csv": load_cohort, "read_summary": load_summary}
