"""Prompt sets for training: files on disk or the built-in sets in ``lineas/data``.

A prompt spec is one of

* a path to ``.txt`` (one prompt per non-empty line), ``.jsonl`` (one object
  per line with a string field ``text``) or ``.json`` (a list of strings);
* ``builtin:<name>`` -- the file ``lineas/data/<name>.txt``;
* a bare ``<name>`` that is not an existing path but names a built-in set.

Every set carries a description and the sha256 of its content, which end up
in the maps file's metadata so a maps file says what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_PREFIX = "builtin:"
SUFFIXES = (".txt", ".jsonl", ".json")


class PromptError(ValueError):
    """A prompt file or built-in name is missing, malformed or empty."""


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    description: str  # "builtin:negative" or the path as given
    sha256: str  # of the file bytes (files) -- identifies the data exactly

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, holdout: float, seed: int) -> tuple[PromptSet, PromptSet]:
        """Seeded (train, held-out) split; ``holdout`` is the held-out fraction."""
        train, held = split_texts(self.texts, holdout, seed)
        return (PromptSet(tuple(train), self.description + " [train]", self.sha256),
                PromptSet(tuple(held), self.description + " [holdout]", self.sha256))


def builtin_names() -> list[str]:
    """Names of the built-in prompt sets (whatever ``lineas/data/*.txt`` holds)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.txt")) if DATA_DIR.is_dir() else []


def load_prompts(spec: str) -> PromptSet:
    """Load a prompt set from a file path, ``builtin:<name>`` or a bare built-in name."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec[len(BUILTIN_PREFIX):])
    path = Path(spec).expanduser()
    if not path.exists() and path.suffix.lower() not in SUFFIXES and spec in builtin_names():
        return _load_builtin(spec)
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device?)"
        raise PromptError(f"prompt file {spec!r} is {what}; give a .txt, .jsonl or .json file")
    if not path.is_file():
        names = builtin_names()
        hint = f"; built-in sets: {', '.join(names)}" if names else ""
        raise PromptError(f"prompt file not found: {spec!r}{hint}")
    texts = parse_prompt_file(path)
    return PromptSet(tuple(texts), spec, _sha256(path.read_bytes()))


def prompt_file(spec: str) -> Path | None:
    """The file a prompt spec reads (a path, or a built-in set's file in ``lineas/data``), resolved through
    symlinks; None when it names nothing.  What an output path must never be."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        path = DATA_DIR / f"{spec[len(BUILTIN_PREFIX):]}.txt"
    else:
        path = Path(spec).expanduser()
        if not path.exists() and spec in builtin_names():
            path = DATA_DIR / f"{spec}.txt"
    return path.resolve() if path.is_file() else None


def _load_builtin(name: str) -> PromptSet:
    path = DATA_DIR / f"{name}.txt"
    if not name or "/" in name or not path.is_file():
        raise PromptError(f"unknown built-in prompt set {name!r}; available: {', '.join(builtin_names()) or 'none'}")
    return PromptSet(tuple(parse_prompt_file(path)), BUILTIN_PREFIX + name, _sha256(path.read_bytes()))


def parse_prompt_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e})") from None
    if suffix == ".txt":
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise PromptError(f"{path}:{n}: each line must be an object with a string field 'text'")
            texts.append(obj["text"])
    elif suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(obj, list) or not all(isinstance(t, str) for t in obj):
            raise PromptError(f"{path}: a .json prompt file must hold a list of strings")
        texts = list(obj)
    else:
        raise PromptError(f"{path}: unsupported prompt file type {suffix!r} (use .txt, .jsonl or .json)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise PromptError(f"{path}: no prompts in file")
    return texts


def split_texts(texts, holdout: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held-out); both parts non-empty when holdout > 0."""
    import random

    texts = list(texts)
    if not 0.0 <= holdout < 1.0:
        raise PromptError(f"holdout fraction must be in [0, 1), got {holdout}")
    if holdout == 0.0:
        return texts, []
    n_held = max(1, round(holdout * len(texts)))
    if n_held >= len(texts):
        raise PromptError(f"holdout {holdout} leaves no training prompts out of {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def texts_sha256(texts) -> str:
    """Fingerprint of an in-memory prompt list (when there is no file)."""
    return _sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
