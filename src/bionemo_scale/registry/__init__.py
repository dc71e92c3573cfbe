"""Named release resources, resolved the way bionemo-core's `bionemo.core.data.load` does.

bionemo-core 2.4.5 cannot be installed beside this stack (its ngcsdk dependency pins
certifi<2025, against the certifi the rest of the stack brings), so this is a small
equivalent with the same conventions: YAML resources with a tag, a URL and a sha256; one
download into a cache directory; checksum verification; `file://` URLs and plain local paths
behave exactly like remote ones, so tests never need the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from bionemo_scale.atomic import atomic_dir
from bionemo_scale.errors import ScaleError

logger = logging.getLogger(__name__)

ENV_REGISTRY = "BIONEMO_SCALE_REGISTRY"
ENV_CACHE = "BIONEMO_SCALE_CACHE"
# The files every release directory holds (mirrors train.release.RELEASE_FILES, which imports torch).
REQUIRED_FILES = ("model.safetensors", "config.yaml", "vocab.json")


@dataclass(frozen=True)
class Resource:
    tag: str
    url: str
    sha256: str
    recipe: str = ""
    data: str = ""
    owner: str = ""
    description: str = ""


def _read(path_or_text: str, where: str) -> list[Resource]:
    try:
        entries = yaml.safe_load(path_or_text) or []
    except yaml.YAMLError as exc:
        raise ScaleError(f"registry {where} is not valid YAML ({exc.__class__.__name__})", "fix the file") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ScaleError(f"registry {where} must be a YAML list of mappings (tag, url, sha256, ...)", "fix the file")
    out = []
    for entry in entries:
        missing = {"tag", "url", "sha256"} - set(entry)
        if missing:
            raise ScaleError(f"registry {where}: entry {entry.get('tag', '?')} lacks {sorted(missing)}", "add them")
        out.append(Resource(**{k: str(v) for k, v in entry.items() if k in Resource.__dataclass_fields__}))
    return out


def registry() -> dict[str, Resource]:
    """The packaged registry plus the one named by $BIONEMO_SCALE_REGISTRY (which wins)."""
    text = (resources.files("bionemo_scale.registry") / "releases.yaml").read_text()
    found = {r.tag: r for r in _read(text, "releases.yaml")}
    extra = os.environ.get(ENV_REGISTRY)
    if extra:
        path = Path(extra)
        if not path.exists():
            raise ScaleError(f"${ENV_REGISTRY} points to {path}, which does not exist", "fix the variable")
        found.update({r.tag: r for r in _read(path.read_text(), str(path))})
    return found


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "bionemo-scale"))


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("file", "http", "https"):
        raise ScaleError(f"unsupported URL scheme in {url}", "use https://, http:// or file://")
    try:
        if parsed.scheme == "file":
            shutil.copyfile(urllib.request.url2pathname(parsed.path), dest)
        else:
            logger.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as f:
                shutil.copyfileobj(response, f)
    except OSError as exc:  # missing file, HTTP error, no network (URLError is an OSError)
        raise ScaleError(
            f"could not fetch {url} ({exc.__class__.__name__}: {exc})", "check the URL and the network"
        ) from None


def load(tag: str) -> Path:
    """Local directory of a registered release, downloading and verifying it once."""
    reg = registry()
    if tag not in reg:
        raise ScaleError(
            f"unknown release '{tag}'", f"use a path, a file:// URL, or one of {sorted(reg) or '(none registered)'}"
        )
    res = reg[tag]
    target = cache_dir() / tag.replace(":", "-").replace("/", "_")
    if all((target / name).exists() for name in REQUIRED_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = target.with_name(target.name + ".download")  # not with_suffix: tags like x:0.1 and x:0.2
    try:
        _fetch(res.url, archive)
        got = sha256sum(archive)
        if got != res.sha256.strip().lower():
            raise ScaleError(
                f"release {tag} has sha256 {got[:12]}…, the registry says {res.sha256[:12]}…",
                "re-download, or fix the registry entry",
            )
        with atomic_dir(target, overwrite=True) as tmp:
            _unpack(archive, tmp)
            missing = [name for name in REQUIRED_FILES if not (tmp / name).exists()]
            if missing:  # checked before the rename, so a broken archive is never cached
                raise ScaleError(f"release {tag} lacks {missing}", "publish a .tar.gz of an exported release directory")
    finally:
        archive.unlink(missing_ok=True)
    return target


def _unpack(archive: Path, into: Path) -> None:
    if not tarfile.is_tarfile(archive):
        raise ScaleError(f"{archive.name} is not a tar archive", "publish releases as .tar.gz of the release directory")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    inner = [p for p in into.iterdir()]
    if len(inner) == 1 and inner[0].is_dir():  # archive of the directory itself
        for child in inner[0].iterdir():
            child.rename(into / child.name)
        inner[0].rmdir()


def resolve(source: str) -> Path:
    """A release directory from a path, a file:// URL of a directory, or a registry tag."""
    if source.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
        if path.is_dir():
            return path
    elif Path(source).exists():
        return Path(source)
    if "://" in source:
        raise ScaleError(f"{source} is not a release directory", "register archives by tag, or pass a directory")
    return load(source)


def pack(release_dir: Path, archive: Path) -> str:
    """Write a .tar.gz of a release directory; returns its sha256 (for a registry entry)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(release_dir, arcname=release_dir.name)
    return sha256sum(archive)
