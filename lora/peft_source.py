"""Where an adapter's files come from: a confined local directory or an allowed Hugging Face hub snapshot.

Safe by default for a network service. A local source must resolve (``os.path.realpath``: symlinks
followed, ``..`` collapsed) inside one of ``LoRAConfig.adapter_roots`` (the registry adds
``adapter_dir`` and the built-in demo adapters), and so must every file read from it. With no
roots, no local path is allowed. Whether a path is outside the roots or missing gets the same
error, so the answer says nothing about the rest of the disk. A source of the form ``org/name``
that is no directory inside the roots is a hub id, downloaded with ``snapshot_download`` (only
the adapter files) when ``allow_hub_adapters`` is on and, if ``hub_adapter_orgs`` is set, its
organisation is listed. URL-encoded forms, schemes and NUL bytes are refused outright.
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
    roots = tuple(os.path.realpath(r) for r in cfg.adapter_roots)
    real = os.path.realpath(source)
    if roots and _inside(real, roots) and os.path.isdir(real):
        return Resolved(name, Path(real), source, roots)
    if _HUB_ID.match(source) and ".." not in source.split("/"):
        _check_hub_allowed(name, source, cfg)
        return Resolved(name, _download(name, source, revision, cfg), source)
    raise AdapterSourceForbiddenError(name, f"source '{source}' is not an adapter directory inside the allowed "
                                            "adapter roots")


def _check_hub_allowed(name: str, repo_id: str, cfg: LoRAConfig) -> None:
    if not cfg.allow_hub_adapters:
        raise AdapterSourceForbiddenError(name, f"source '{repo_id}' is not an adapter directory inside the "
                                                "allowed adapter roots, and hub adapters are off on this server "
                                                "(allow_hub_adapters)")
    org = repo_id.split("/", 1)[0]
    if cfg.hub_adapter_orgs and org not in cfg.hub_adapter_orgs:
        raise AdapterSourceForbiddenError(name, f"hub organisation '{org}' is not in the allowed list "
                                                "(hub_adapter_orgs)")


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
