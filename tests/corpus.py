"""A small synthetic text corpus for tests: files of random words, plus an empty, a too
short and a duplicate document."""

from __future__ import annotations

import random
from pathlib import Path


def write_corpus(folder: Path, n: int = 120) -> str:
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hex",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 200)))
        (folder / f"doc{i:04d}.txt").write_text(f"Document {i % 100}.\n{body}")
    (folder / "empty.txt").write_text("   \n")
    (folder / "short.txt").write_text("hi")
    (folder / "dup.txt").write_text((folder / "doc0003.txt").read_text())
    return str(folder / "*.txt")
