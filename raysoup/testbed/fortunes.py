"""Text evaluation data: the fortunes topic task, its shifts, and Arrow storage.

The text testbed classifies fortune cookies by the category file they come from (Debian's
`fortunes` package). Every set is plain text with an int64 label, stored as Arrow IPC
(columns `text`, `label`); the evaluator tokenises it with the tokenizer saved beside the
model. The shifts are pure functions of the texts and a seed, so a shipped zoo can record
each set's content sha256 and every machine makes the same sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from ..inputs.data import DataError

DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")
# The topic classes: category files of Debian's `fortunes` package with 580+ entries that
# name a topic (`cookie` and `miscellaneous` do not).
CLASSES = (
    "computers",
    "definitions",
    "men-women",
    "people",
    "politics",
    "science",
    "songs-poems",
    "work",
)
# Held-out sources: category files of the same package never trained on, each read as the
# class whose topic it belongs to (the `sources` shift).
HELD_OUT_SOURCES = {
    "linux": "computers",
    "linuxcookie": "computers",
    "perl": "computers",
    "love": "men-women",
    "law": "politics",
    "medicine": "science",
}
SPLIT_SEED = 20240624
VAL_FRACTION, ID_FRACTION = 0.15, 0.20  # per class; the rest is the training split
SHIFT_SEED = 2000  # shift i draws from seed SHIFT_SEED + i
# Shift strengths, part of the shifts' definition (their sets' sha256 depend on them).
TYPO_RATE = 0.06  # chance per character of a swap with the next one or a drop
RANDOM_CASE_SHARE = 0.5  # of texts: each letter's case flipped at random; the rest upper case
WORD_DROPOUT = 0.3  # chance per word of being dropped


@dataclass
class TextSet:
    name: str
    texts: list[str]
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


def fortunes_dir() -> Path:
    return Path(os.environ.get("RAYSOUP_FORTUNES_DIR", DEFAULT_FORTUNES_DIR))


def clean(entry: str) -> str:
    """One fortune as one line: overstrike (x BACKSPACE y) resolved to y, whitespace runs
    (line breaks, tab indents) to one space."""
    return " ".join(re.sub(r".\x08", "", entry).split())


def read_fortune_file(path: Path) -> list[str]:
    """The cleaned, non-empty entries of a fortune file (entries end at a line '%')."""
    try:
        raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read fortune file {path}: {e}") from e
    entries = (clean(e) for e in re.split(r"^%$", raw, flags=re.MULTILINE))
    return [e for e in entries if e]


def load_fortunes(
    root: Path | None = None, files: tuple[str, ...] = CLASSES
) -> dict[str, list[str]]:
    """file name -> its entries, in file order, for the named category files."""
    root = Path(root) if root else fortunes_dir()
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"fortunes not found in {root} (missing {', '.join(missing)}). Install them with "
            "`apt-get install fortunes` or set RAYSOUP_FORTUNES_DIR to a folder holding the "
            "category files"
        )
    return {f: read_fortune_file(root / f) for f in files}


def topic_splits(root: Path | None = None) -> dict[str, TextSet]:
    """train, val and id (in-distribution test) of the topic task, stratified per class.

    An entry found in two category files, or twice in one, is kept once at most, and only
    when all its copies share a class: no text is in two splits or under two labels.
    """
    by_file = load_fortunes(root)
    owners: dict[str, set[int]] = {}
    for label, name in enumerate(CLASSES):
        for text in by_file[name]:
            owners.setdefault(text, set()).add(label)
    parts: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "val", "id")}
    for label, name in enumerate(CLASSES):
        texts = sorted({t for t in by_file[name] if owners[t] == {label}})
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(texts))
        n_val, n_id = round(VAL_FRACTION * len(texts)), round(ID_FRACTION * len(texts))
        cuts = {
            "val": order[:n_val],
            "id": order[n_val : n_val + n_id],
            "train": order[n_val + n_id :],
        }
        for split, rows in cuts.items():
            parts[split][0].extend(texts[i] for i in sorted(rows))
            parts[split][1].extend([label] * len(rows))
    return {
        s: TextSet(s, texts, np.array(labels, dtype=np.int64))
        for s, (texts, labels) in parts.items()
    }


def held_out_sources(exclude: set[str], root: Path | None = None) -> TextSet:
    """The `sources` shift: entries of the held-out category files under their topic's
    label, minus any text in `exclude` (the topic task's own entries)."""
    by_file = load_fortunes(root, tuple(HELD_OUT_SOURCES))
    texts, labels, seen = [], [], set(exclude)
    for name, topic in HELD_OUT_SOURCES.items():
        for text in by_file[name]:
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(CLASSES.index(topic))
    return TextSet("sources", texts, np.array(labels, dtype=np.int64))


# Shifts: text -> shifted text, with a numpy Generator per text (seeded by the set's seed
# and the row), so a row's shift does not depend on the rows before it.
def typos(text: str, rng: np.random.Generator) -> str:
    """Keyboard slips: each character, with chance TYPO_RATE, swapped with the next one or
    dropped. Never longer; shorter by the drops only."""
    chars, out, i = list(text), [], 0
    while i < len(chars):
        if rng.random() < TYPO_RATE:
            if rng.random() < 0.5 and i + 1 < len(chars):
                out += [chars[i + 1], chars[i]]
                i += 2
                continue
            i += 1  # dropped
            continue
        out.append(chars[i])
        i += 1
    return "".join(out) or text


def _upper(c: str) -> str:
    """c upper-cased where that is one character (not 'ß' -> 'SS'): lengths stay."""
    u = c.upper()
    return u if len(u) == 1 else c


def casing(text: str, rng: np.random.Generator) -> str:
    """All upper case, or (RANDOM_CASE_SHARE of texts) each letter's case drawn at random."""
    if rng.random() >= RANDOM_CASE_SHARE:
        return "".join(_upper(c) for c in text)
    flips = rng.random(len(text)) < 0.5
    return "".join(
        _upper(c) if f else c.lower() if len(c.lower()) == 1 else c for c, f in zip(text, flips)
    )


def word_dropout(text: str, rng: np.random.Generator, rate: float = WORD_DROPOUT) -> str:
    """Each space-separated word dropped with chance `rate`; at least one word stays."""
    words = text.split(" ")
    keep = rng.random(len(words)) >= rate
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


SHIFTS = {"typos": typos, "casing": casing, "word_dropout": word_dropout}
SHIFT_NAMES = (*SHIFTS, "sources")


def make_shift(texts: list[str], shift: str, seed: int) -> list[str]:
    """The shifted copy of `texts`: row i drawn from the Generator of (seed, i)."""
    fn = SHIFTS[shift]
    return [fn(t, np.random.default_rng([seed, i])) for i, t in enumerate(texts)]


def build_text_eval_sets(root: Path | None = None) -> list[TextSet]:
    """val, id, one shifted copy of id per shift, and the held-out sources."""
    splits = topic_splits(root)
    test = splits["id"]
    sets = [splits["val"], test]
    for i, shift in enumerate(SHIFTS):
        sets.append(TextSet(shift, make_shift(test.texts, shift, SHIFT_SEED + i), test.labels))
    every = {t for s in splits.values() for t in s.texts}
    sets.append(held_out_sources(every, root))
    return sets


def text_content_sha256(texts: list[str], labels: np.ndarray) -> str:
    """A text set's fingerprint over its rows, not the Arrow file's bytes (which may change
    with the pyarrow version): sha256 of the JSON `["text", [texts...]]` (json.dumps
    defaults), then of the labels as int64 bytes. The same as the model families'
    `data.content_sha256` of a text set, so a run's sha256 check accepts these sets."""
    h = hashlib.sha256(json.dumps(["text", list(texts)]).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def write_text_set(text_set: TextSet, path: Path) -> None:
    table = pa.table(
        {
            "text": pa.array(text_set.texts, type=pa.string()),
            "label": pa.array(text_set.labels, type=pa.int64()),
        }
    )
    table = table.replace_schema_metadata({"name": text_set.name})
    tmp = Path(path).with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)


def read_text_set(path: Path) -> TextSet:
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read text set {path}: {e}") from e
    if not {"text", "label"} <= set(table.schema.names):
        raise DataError(f"{path} is not a text evaluation set (need columns text, label)")
    name = (table.schema.metadata or {}).get(b"name", Path(path).stem.encode()).decode()
    return TextSet(
        name, table.column("text").to_pylist(), table.column("label").to_numpy().astype(np.int64)
    )


def verify_text_set(path: Path, sha256: str, name: str) -> None:
    """Refuse a set whose content is not what the manifest recorded."""
    text_set = read_text_set(path)
    got = text_content_sha256(text_set.texts, text_set.labels)
    if got != sha256:
        raise DataError(
            f"text set {name!r} ({path}): content sha256 {got[:16]}... does not "
            f"match the manifest's {sha256[:16]}...; restore it or rebuild the zoo"
        )
