"""One registry for every versioned artifact: the car filter, the detector, the
classifier and datasets (DESIGN.md, "Registry").

A version is ``<kind prefix>/<version>/`` (:mod:`carflow.keys`) holding its files plus a
``meta.json``; ``<kind prefix>/latest.json`` is the one pointer shape::

    {"kind": "classifier", "version": "20261127T...-ab12", "meta": "models/classifier/<v>/meta.json",
     "main": "model.keras", "updated_at": "...", "rule": "...", "reason": "..."}

Write order makes a half-written version invisible: :meth:`Registry.put_version` writes
every file first, then ``meta.json`` (a version exists only once its ``meta.json`` does),
and a pointer moves (:meth:`Registry.promote`) only to a version whose ``meta.json`` is
there. Versions are usually content keys, so two runs that write the same version write the
same bytes.

:meth:`Registry.resolve` turns what a user types into a :class:`Version`: ``latest`` (or
another pointer name), a version id, a local path (a version folder or one file), or an
``s3://`` / ``file://`` URI of either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from carflow import keys
from carflow.errors import UserError
from carflow.storage import Storage, local_file, open_storage

#: the file a kind's consumers load first, when ``meta.json`` does not name one
MAIN_FILES: dict[str, str] = {
    "car_filter": "model.keras",
    "detector": "weights.pt",
    "classifier": "model.keras",
    "dataset": "classes.json",
}


class RegistryError(UserError, LookupError):
    """A version or pointer that does not exist; the message says what to run."""


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version_id(content_hash: str | None = None) -> str:
    """A sortable version id: ``YYYYmmddTHHMMSS-<hash[:10]>`` (or just the hash's prefix
    when the caller wants a pure content key, by passing it as the version itself)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{(content_hash or os.urandom(8).hex())[:10]}"


@dataclass(frozen=True)
class Version:
    """One stored version: where its files are, and its ``meta.json``."""

    kind: str
    version: str
    storage: Storage
    prefix: str  # key of the version folder inside ``storage`` ("" when storage *is* the folder)
    meta: dict[str, Any] = field(default_factory=dict)
    main: str = ""

    def key(self, name: str = "") -> str:
        if not self.prefix:
            return name
        return f"{self.prefix}/{name}" if name else self.prefix

    def uri(self, name: str = "") -> str:
        return self.storage.uri(self.key(name))

    def exists(self, name: str) -> bool:
        return self.storage.exists(self.key(name))

    def get(self, name: str) -> bytes:
        return self.storage.get(self.key(name))

    def get_json(self, name: str) -> Any:
        return json.loads(self.get(name))

    def files(self) -> list[str]:
        base = self.key()
        return [k[len(base) + 1 :] if base else k for k in self.storage.list(f"{base}/" if base else "")]

    def local_path(self, name: str | None = None) -> Path:
        """A local file for ``name`` (default: the main file): the file itself on local
        storage, else a cached download (see :func:`carflow.storage.local_file`)."""
        return local_file(self.uri(name or self.main))

    @contextmanager
    def local_dir(self, names: list[str] | None = None) -> Iterator[Path]:
        """The version's files (or ``names``) as one local folder (downloaded when remote)."""
        from carflow.storage import LocalStorage

        if isinstance(self.storage, LocalStorage):
            yield Path(self.storage.uri(self.key()).removeprefix("file://"))
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="carflow-version-") as tmp:
            for name in names if names is not None else self.files():
                dest = Path(tmp) / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.get(name))
            yield Path(tmp)


FileSource = bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class Decision:
    """What :meth:`Registry.promote` decided, with the numbers it compared."""

    promoted: bool
    reason: str
    candidate: str
    incumbent: str | None
    candidate_value: float | None = None
    incumbent_value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: a promotion rule: (candidate meta, incumbent meta or None) → (promote?, reason, cand. value, inc. value)
Rule = Callable[[dict[str, Any], dict[str, Any] | None], tuple[bool, str, float | None, float | None]]


def always(_cand: dict[str, Any], _inc: dict[str, Any] | None) -> tuple[bool, str, None, None]:
    return True, "always", None, None


def metric_at_least(metric: str, path: tuple[str, ...] = ("metrics",)) -> Rule:
    """Champion/challenger: promote when ``meta[path...][metric]`` of the candidate is at
    least the incumbent's (or there is no incumbent, or it has no such metric)."""

    def get(meta: dict[str, Any] | None) -> float | None:
        node: Any = meta or {}
        for p in (*path, metric):
            if not isinstance(node, Mapping) or p not in node:
                return None
            node = node[p]
        return None if node is None else float(node)

    def rule(cand: dict[str, Any], inc: dict[str, Any] | None) -> tuple[bool, str, float | None, float | None]:
        c, i = get(cand), get(inc)
        if inc is None:
            return True, "no current version", c, None
        if c is None:
            return False, f"candidate has no {metric}", None, i
        if i is None:
            return True, f"current version has no {metric}", c, None
        if c >= i:
            return True, f"{metric} {c:.4f} >= current {i:.4f}", c, i
        return False, f"{metric} {c:.4f} < current {i:.4f}", c, i

    rule.__name__ = f"{metric}_at_least"
    return rule


class Registry:
    """Versioned artifacts over one :class:`~carflow.storage.Storage`."""

    def __init__(self, storage: Storage | str | None = None):
        self.storage = open_storage(storage)

    # -- writing -------------------------------------------------------------------------
    def put_version(
        self,
        kind: str,
        files: Mapping[str, FileSource],
        meta: Mapping[str, Any] | None = None,
        version: str | None = None,
        main: str | None = None,
    ) -> Version:
        """Write ``files`` (name → bytes, text or a local path) under
        ``<kind>/<version>/``, then ``meta.json`` last. Does not move any pointer (see
        :meth:`promote`). ``version`` defaults to a new time-sortable id."""
        version = version or new_version_id()
        prefix = keys.version_key(kind, version)
        for name, src in files.items():
            if isinstance(src, bytes):
                data = src
            elif isinstance(src, str) and not os.path.exists(src):
                data = src.encode()
            else:
                data = Path(src).read_bytes()
            self.storage.put(f"{prefix}/{name}", data)
        doc = {
            "kind": kind,
            "version": version,
            "created_at": now_iso(),
            "main": main or MAIN_FILES.get(kind, ""),
            "files": sorted(set(files) | set((meta or {}).get("files", []))),
            **{k: v for k, v in (meta or {}).items() if k != "files"},
        }
        self.storage.put(f"{prefix}/{keys.META_NAME}", json.dumps(doc, indent=2, default=str).encode(),
                         content_type="application/json")
        return Version(kind, version, self.storage, prefix, doc, doc["main"])

    def update_meta(self, version: Version, **fields: Any) -> Version:
        """Add fields to a stored version's ``meta.json`` (metrics after evaluation)."""
        doc = {**version.meta, **fields}
        self.storage.put(version.key(keys.META_NAME), json.dumps(doc, indent=2, default=str).encode(),
                         content_type="application/json")
        return Version(version.kind, version.version, version.storage, version.prefix, doc, version.main)

    def promote(self, kind: str, version: str | Version, rule: Rule | str = "always",
                pointer: str = "latest") -> Decision:
        """Move ``pointer`` to ``version`` when ``rule`` says so (``"always"``, or a
        :data:`Rule` such as :func:`metric_at_least`). The decision, with both numbers,
        is written to ``<version>/promotion.json`` and returned."""
        cand = version if isinstance(version, Version) else self.get(kind, version)
        current = self.latest(kind, pointer)
        fn: Rule = always if rule == "always" else rule  # type: ignore[assignment]
        ok, reason, cv, iv = fn(cand.meta, current.meta if current else None)
        if current is not None and current.version == cand.version:
            ok, reason = True, f"already {pointer}"
        decision = Decision(ok, reason, cand.version, current.version if current else None, cv, iv)
        doc = {**decision.as_dict(), "pointer": pointer, "rule": getattr(fn, "__name__", str(rule)),
               "decided_at": now_iso()}
        self.storage.put(cand.key("promotion.json"), json.dumps(doc, indent=2).encode(),
                         content_type="application/json")
        if ok:
            self.storage.put(
                keys.pointer_key(kind, pointer),
                json.dumps({"kind": kind, "version": cand.version, "meta": cand.key(keys.META_NAME),
                            "main": cand.main, "updated_at": now_iso(), "rule": doc["rule"],
                            "reason": reason}, indent=2).encode(),
                content_type="application/json",
            )
        return decision

    # -- reading -------------------------------------------------------------------------
    def get(self, kind: str, version: str) -> Version:
        """A stored version by id; :class:`RegistryError` when its ``meta.json`` is absent."""
        prefix = keys.version_key(kind, version)
        try:
            meta = json.loads(self.storage.get(f"{prefix}/{keys.META_NAME}"))
        except KeyError:
            where = self.storage.uri(keys.registry_prefix(kind))
            if any(True for _ in self.storage.list(f"{prefix}/")):
                raise RegistryError(
                    f"{kind} version {version!r} does not exist in {where}: it has files but no {keys.META_NAME} "
                    f"(an incomplete version, or one written before the registry existed); "
                    f"{MAKE_HINTS.get(kind, 'make it again')}"
                ) from None
            raise RegistryError(f"{kind} version {version!r} does not exist in {where}") from None
        return Version(kind, version, self.storage, prefix, meta, meta.get("main") or MAIN_FILES.get(kind, ""))

    def latest(self, kind: str, pointer: str = "latest") -> Version | None:
        """The version ``pointer`` names, or None when there is no pointer yet."""
        try:
            doc = json.loads(self.storage.get(keys.pointer_key(kind, pointer)))
        except KeyError:
            return None
        return self.get(kind, doc["version"])

    def versions(self, kind: str) -> list[Version]:
        """Every complete version of ``kind`` (those with a ``meta.json``), oldest first."""
        base = keys.registry_prefix(kind) + "/"
        out = []
        for k in self.storage.list(base):
            rest = k[len(base):]
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == keys.META_NAME:
                try:
                    out.append(self.get(kind, parts[0]))
                except (RegistryError, ValueError):
                    continue
        return sorted(out, key=lambda v: (str(v.meta.get("created_at", "")), v.version))

    def resolve(self, kind: str, spec: str | os.PathLike[str] | None = "latest",
                setting: str | None = None) -> Version:
        """``latest`` / a pointer name, a version id, a path or ``s3://``/``file://`` URI (of a
        version folder or of one file) → :class:`Version`. Errors name ``setting`` and the
        command that makes a version."""
        text = os.fspath(spec) if spec is not None else "latest"
        text = text.strip() or "latest"
        where = f" (set by {setting})" if setting else ""
        if "://" not in text and "/" not in text and "\\" not in text and not text.startswith("."):
            if self.storage.exists(keys.pointer_key(kind, text)):
                return self.get(kind, json.loads(self.storage.get(keys.pointer_key(kind, text)))["version"])
            if text == "latest":
                raise RegistryError(
                    f"no {kind} has been registered in {self.storage.uri(keys.registry_prefix(kind))} yet"
                    f"{where}: {MAKE_HINTS.get(kind, 'make one first')}")
            if self.storage.exists(keys.version_key(kind, text, keys.META_NAME)):
                return self.get(kind, text)
            if not Path(text).exists():
                known = ", ".join(v.version for v in self.versions(kind)[-5:]) or "none"
                raise RegistryError(f"{kind} version {text!r}{where} does not exist in "
                                    f"{self.storage.uri(keys.registry_prefix(kind))} (latest versions: {known})")
        return self._resolve_location(kind, text, where)

    def _resolve_location(self, kind: str, text: str, where: str) -> Version:
        if "://" not in text:
            path = Path(text).expanduser()
            if not path.exists():
                raise RegistryError(f"{kind}{where}: {text} does not exist")
            text = str(path.resolve())
        store = open_storage(text)
        if store.exists(keys.META_NAME):  # a version folder
            meta = json.loads(store.get(keys.META_NAME))
            return Version(kind, str(meta.get("version") or text.rstrip("/").rsplit("/", 1)[-1]), store, "",
                           meta, meta.get("main") or MAIN_FILES.get(kind, ""))
        head, _, name = text.rstrip("/").rpartition("/")
        parent = open_storage(head or ".")
        if not parent.exists(name):
            raise RegistryError(f"{kind}{where}: {text} does not exist (neither a version folder with "
                                f"{keys.META_NAME} nor a file)")
        meta: dict[str, Any] = {}
        for side in (keys.META_NAME, "config.json"):
            if parent.exists(side):
                try:
                    meta = json.loads(parent.get(side))
                    break
                except ValueError:
                    pass
        version = str(meta.get("version") or head.rstrip("/").rsplit("/", 1)[-1] or name)
        return Version(kind, version, parent, "", meta, name)


#: the command that makes a version of each kind, for error messages
MAKE_HINTS: dict[str, str] = {
    "car_filter": "run `carflow car-filter train --labels labels.csv` (or set car_filter.model)",
    "detector": "run `carflow crop train --data data.yaml` (or set crop.weights)",
    "classifier": "run `carflow train`",
    "dataset": "run `carflow dataset`",
}
