"""Build the bundled fortunes extract shipped in `fcmoe_hf/data/bundled/`.

The source is the Debian package `fortunes` (fortune-mod data files, one file per category, entries separated by
lines holding a single `%`). The script reads the chosen category files, cleans and deduplicates the entries, caps
every category at `--max_per_category` entries, makes a seeded stratified train/test split and writes
`fortunes_train.jsonl.gz` / `fortunes_test.jsonl.gz` (fields `text`, `category`) plus `FORTUNES_SOURCE.md`.

Run (needs `apt-get install fortunes`; nothing else is downloaded):

    python scripts/build_fortunes.py

The outputs are byte-for-byte reproducible for the same package version, arguments and seed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

DEFAULT_SOURCE_DIR = Path("/usr/share/games/fortunes")
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "fcmoe_hf" / "data" / "bundled"
DEFAULT_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")

#: Topical categories of the `fortunes` package kept in the extract. Chosen among the files with >= ~180 usable entries
#: for being about one subject each (so the category is learnable from the text) while overlapping enough (work vs.
#: politics vs. law, computers vs. science) that predicting it is not trivial. Left out: grab-bags (`cookie`,
#: `people`, `miscellaneous`, `definitions`, `platitudes`, `fortunes`, `zippy`, `art`), near-duplicates of a kept
#: topic (`linux`, `linuxcookie`, `perl` vs. `computers`) and files with too few entries (`medicine`, `pets`, ...).
DEFAULT_CATEGORIES = (
    "computers",
    "drugs",
    "education",
    "food",
    "law",
    "literature",
    "politics",
    "science",
    "startrek",
    "work",
)

_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "X\bX", "_\bX"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HSPACE = re.compile(r"[ \t]+")


def read_fortune_file(path: Path) -> list[str]:
    """Split one fortune data file into its raw entries (separated by lines that hold only `%`)."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few historical fortune files are Latin-1; decoding them as such keeps every entry.
        content = raw.decode("latin-1")
    entries, current = [], []
    for line in content.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return entries


def clean_entry(text: str) -> str:
    """Normalise one entry: drop nroff overstriking and control characters, collapse horizontal whitespace.

    Fortune files indent attributions with tabs (`\\t\\t-- Author`) and use backspace overstriking for emphasis; both
    only cost tokens, so they are reduced to plain text. Line breaks are kept (verse, dialogues).
    """
    text = unicodedata.normalize("NFC", text)
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    text = _CONTROL.sub("", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line inside an entry
    return text.strip()


def _dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def _package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (dpkg-query unavailable)"
    return out.stdout.strip() or "unknown"


def _write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> None:
    buffer = io.BytesIO()
    # mtime=0 and an empty embedded file name make the archive bytes reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def build(
    source_dir: Path = DEFAULT_SOURCE_DIR,
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
    max_per_category: int = 200,
    min_chars: int = 20,
    max_chars: int = 600,
    test_fraction: float = 0.2,
    seed: int = 0,
    command: str | None = None,
) -> dict[str, dict[str, int]]:
    """Build the extract and return `{category: {"available": n, "train": n, "test": n}}`.

    Args:
        source_dir (`Path`): directory of the fortune data files (`/usr/share/games/fortunes`).
        output_dir (`Path`): where the `.jsonl.gz` files and `FORTUNES_SOURCE.md` are written.
        categories (`tuple[str, ...]`): category (file) names to keep.
        max_per_category (`int`): cap on the entries kept per category (a seeded sample).
        min_chars (`int`): entries shorter than this (after cleaning) are dropped.
        max_chars (`int`): entries longer than this (after cleaning) are dropped.
        test_fraction (`float`): share of every category put in the test split.
        seed (`int`): seed of the sampling and of the split.
        command (`str`, *optional*): the command line recorded in `FORTUNES_SOURCE.md`.
    """
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"fortune data directory {str(source_dir)!r} not found: install the Debian package "
            "(`apt-get install fortunes`) or pass --source_dir"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_per_category < 2:
        raise ValueError(f"max_per_category must be >= 2, got {max_per_category}")
    if len(set(categories)) != len(categories) or len(categories) < 2:
        raise ValueError(f"categories must be at least two distinct names, got {list(categories)}")

    cleaned: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    for category in categories:
        path = source_dir / category
        if not path.is_file():
            raise FileNotFoundError(f"category file {str(path)!r} not found in the fortune data directory")
        hashes[category] = hashlib.sha256(path.read_bytes()).hexdigest()
        entries = [clean_entry(entry) for entry in read_fortune_file(path)]
        cleaned[category] = [e for e in entries if min_chars <= len(e) <= max_chars]

    # The same saying filed under two categories has no single true label: drop it everywhere; repeats within a
    # category are kept once.
    owners: dict[str, set[str]] = {}
    for category, entries in cleaned.items():
        for entry in entries:
            owners.setdefault(_dedupe_key(entry), set()).add(category)
    rng = random.Random(seed)
    train_rows: list[dict[str, str]] = []
    test_rows: list[dict[str, str]] = []
    stats: dict[str, dict[str, int]] = {}
    for category in categories:
        seen: set[str] = set()
        unique: list[str] = []
        for entry in cleaned[category]:
            key = _dedupe_key(entry)
            if key in seen or len(owners[key]) > 1:
                continue
            seen.add(key)
            unique.append(entry)
        if len(unique) < 2:
            raise ValueError(f"category {category!r} has fewer than 2 usable entries after cleaning")
        kept = rng.sample(unique, min(max_per_category, len(unique)))
        num_test = max(1, round(test_fraction * len(kept)))
        test_rows += [{"text": t, "category": category} for t in kept[:num_test]]
        train_rows += [{"text": t, "category": category} for t in kept[num_test:]]
        stats[category] = {"available": len(unique), "train": len(kept) - num_test, "test": num_test}
    # Interleave categories so that the files are not sorted by label.
    rng.shuffle(train_rows)
    rng.shuffle(test_rows)

    output_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl_gz(output_dir / "fortunes_train.jsonl.gz", train_rows)
    _write_jsonl_gz(output_dir / "fortunes_test.jsonl.gz", test_rows)
    _write_source_note(
        output_dir / "FORTUNES_SOURCE.md",
        stats=stats,
        hashes=hashes,
        settings={
            "max_per_category": max_per_category,
            "min_chars": min_chars,
            "max_chars": max_chars,
            "test_fraction": test_fraction,
            "seed": seed,
        },
        command=command or "python scripts/build_fortunes.py",
    )
    return stats


def _write_source_note(
    path: Path, stats: dict[str, dict[str, int]], hashes: dict[str, str], settings: dict, command: str
) -> None:
    version = _package_version("fortunes")
    license_note = (
        "BSD licence of the University of California (`Copyright (c) 1991 The Regents of the University of "
        "California`), with the advertising clause deleted, as stated in `/usr/share/doc/fortunes/copyright`; "
        "redistribution requires keeping the copyright notice, the list of conditions and the disclaimer, reproduced "
        "below. The entries are quotations and jokes attributed (where known) to their authors inside the text."
    )
    copyright_text = ""
    if DEFAULT_COPYRIGHT.is_file():
        lines = DEFAULT_COPYRIGHT.read_text(encoding="utf-8", errors="replace").splitlines()
        # Keep the licence block itself ("Legal information" up to the next section).
        start = next((i for i, line in enumerate(lines) if "Legal information" in line), None)
        if start is not None:
            end = next(
                (i for i in range(start + 2, len(lines)) if lines[i].startswith("-----") and i > start + 3), len(lines)
            )
            copyright_text = "\n".join(lines[start + 2 : end]).strip()
    total_train = sum(s["train"] for s in stats.values())
    total_test = sum(s["test"] for s in stats.values())
    rows = "\n".join(
        f"| {c} | {s['available']} | {s['train']} | {s['test']} | `{hashes[c][:16]}` |" for c, s in stats.items()
    )
    settings_text = ", ".join(f"`{k}={v}`" for k, v in settings.items())
    note = f"""# Bundled fortunes extract

Real short English texts with a topical category, for the federated demo and benchmark (non-IID partitions over
`category`). Built by `scripts/build_fortunes.py`; loaded by `fcmoe_hf.data.load_bundled_fortunes()`.

- Source: Debian package `fortunes` version `{version}` (fortune-mod data files, `/usr/share/games/fortunes/<category>`).
- Licence: {license_note}
- Files: `fortunes_train.jsonl.gz`, `fortunes_test.jsonl.gz` (gzip JSON lines, fields `text`, `category`).
- Cleaning: nroff overstriking and control characters removed, runs of spaces/tabs collapsed, lines stripped, entries
  shorter than `min_chars` or longer than `max_chars` dropped, repeats within a category kept once, texts filed under
  more than one kept category dropped from all of them; then at most `max_per_category` entries per category (seeded
  sample) and a seeded per-category (stratified) train/test split.
- Settings: {settings_text}.
- Built with: `{command}`

| category | usable entries | train | test | sha256 of source file (prefix) |
|---|---|---|---|---|
{rows}
| **total** | | **{total_train}** | **{total_test}** | |

## Licence text (from `/usr/share/doc/fortunes/copyright`)

```
{copyright_text}
```
"""
    path.write_text(note, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_dir", type=Path, default=DEFAULT_SOURCE_DIR)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    parser.add_argument("--max_per_category", type=int, default=200)
    parser.add_argument("--min_chars", type=int, default=20)
    parser.add_argument("--max_chars", type=int, default=600)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/build_fortunes.py", *map(shlex.quote, argv)])
    stats = build(
        source_dir=args.source_dir,
        output_dir=args.output_dir,
        categories=tuple(args.categories),
        max_per_category=args.max_per_category,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        test_fraction=args.test_fraction,
        seed=args.seed,
        command=command,
    )
    for category, s in stats.items():
        print(f"{category:12s} available={s['available']:5d} train={s['train']:4d} test={s['test']:4d}")
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
