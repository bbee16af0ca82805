"""Where an adapter's files come from: a confined local directory or a Hugging Face hub snapshot.

Local paths, when ``LoRAConfig.adapter_roots`` is non-empty, must resolve (``os.path.realpath``:
symlinks followed, ``..`` collapsed) inside one of the roots, and so must every file read from
the directory (a symlinked weights file pointing outside is refused). URL-encoded forms and NUL
bytes are refused outright; relative paths resolve against the working directory. A source that is not an existing local path and looks like
``org/name`` is a hub id, downloaded with ``snapshot_download`` (only the adapter files).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from loraplex.config import LoRAConfig
from loraplex.errors import AdapterLoadError, AdapterSourceForbiddenError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
HUB_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]


@dataclass(frozen=True)
class Resolved:
    """A resolved adapter directory; ``roots`` (real paths) confine every file read from it."""

    name: str
    path: Path
    source: str
    roots: tuple[str, ...] = ()  # empty: not confined

    def file(self, filename: str) -> Path:
        """Real path of ``filename`` in the directory, refused when it resolves outside the roots."""
        real = os.path.realpath(self.path / filename)
        if self.roots and not _inside(real, self.roots):
            raise AdapterSourceForbiddenError(
                self.name, f"{filename} in '{self.source}' resolves outside the allowed adapter roots")
        return Path(real)


def resolve(name: str, source: str, revision: str | None, cfg: LoRAConfig) -> Resolved:
    """Resolves ``source`` for adapter ``name``; see the module docstring for the rules."""
    _check_text(name, source)
    if not os.path.lexists(source) and _HUB_ID.match(source) and ".." not in source:
        return Resolved(name, _download(name, source, revision, cfg), source)
    roots = tuple(os.path.realpath(r) for r in cfg.adapter_roots)
    real = os.path.realpath(source)
    if roots and not _inside(real, roots):
        raise AdapterSourceForbiddenError(name, f"source '{source}' resolves outside the allowed adapter roots")
    if not os.path.isdir(real):
        raise AdapterLoadError(name, f"source '{source}' is not an adapter directory (no such local directory, "
                                     "and not a hub id of the form org/name)")
    return Resolved(name, Path(real), source, roots)


def _check_text(name: str, source: str) -> None:
    if not isinstance(source, str) or not source.strip():
        raise AdapterLoadError(name, "source is empty")
    if "\x00" in source:
        raise AdapterSourceForbiddenError(name, "source contains a NUL byte")
    if _ENCODED.search(source):
        raise AdapterSourceForbiddenError(name, f"source '{source}' contains URL-encoded characters (%XX); "
                                                "give a plain path")
    if _SCHEME.match(source):
        raise AdapterLoadError(name, f"source '{source}' has a URL scheme; give a local directory or a hub id "
                                     "(org/name)")


def _inside(real: str, roots: tuple[str, ...]) -> bool:
    return any(os.path.commonpath([real, root]) == root for root in roots)


def _download(name: str, repo_id: str, revision: str | None, cfg: LoRAConfig) -> Path:
    patterns = HUB_PATTERNS + (["adapter_model.bin"] if cfg.allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo or revision: all refuse the adapter
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        raise AdapterLoadError(name, f"could not download '{repo_id}' from the Hugging Face hub "
                                     f"({type(e).__name__}: {detail})") from None


def fingerprint(*paths: Path) -> str:
    """Identity of the files an adapter was read from: real path, size and mtime of each.

    The registry compares it when it re-reads an evicted adapter from its source, so a version
    never silently changes weights because the files on disk changed.
    """
    parts = []
    for path in paths:
        st = os.stat(path)
        parts.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)
