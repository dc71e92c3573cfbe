"""The release registry: tags resolve to verified, cached release directories; no network.

Every archive here is served through a file:// URL, which takes exactly the code path of an
https:// download (fetch into the cache, sha256, extract atomically).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from bionemo_scale import registry
from bionemo_scale.errors import ScaleError
from bionemo_scale.registry import REQUIRED_FILES, pack, resolve

TAG = "scale_fake:0.1"


def _release_dir(root: Path, name: str = "scale_fake-0.1", files: tuple[str, ...] = REQUIRED_FILES) -> Path:
    rel = root / name
    rel.mkdir(parents=True)
    for f in files:
        (rel / f).write_text(f"contents of {f}\n")
    (rel / "genes.txt").write_text("g0\ng1\n")
    return rel


def _write_registry(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A packed fake release, a registry that names it by a file:// URL, and an empty cache."""
    rel = _release_dir(tmp_path / "src")
    archive = tmp_path / "served" / "scale_fake-0.1.tar.gz"
    archive.parent.mkdir()
    sha = pack(rel, archive)
    reg = _write_registry(
        tmp_path / "registry.yaml",
        [{"tag": TAG, "url": archive.as_uri(), "sha256": sha, "recipe": "tiny_cpu", "data": "fake"}],
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv(registry.ENV_REGISTRY, str(reg))
    monkeypatch.setenv(registry.ENV_CACHE, str(cache))
    return {"release": rel, "archive": archive, "registry": reg, "cache": cache, "sha": sha, "root": tmp_path}


def test_pack_returns_the_archive_sha256(env) -> None:
    import hashlib

    assert env["sha"] == hashlib.sha256(env["archive"].read_bytes()).hexdigest()
    with tarfile.open(env["archive"]) as tar:
        names = set(tar.getnames())
    assert {f"scale_fake-0.1/{f}" for f in REQUIRED_FILES} <= names


def test_resolve_tag_downloads_verifies_extracts_once_and_caches(env, monkeypatch) -> None:
    res = registry.registry()[TAG]
    assert (res.recipe, res.data) == ("tiny_cpu", "fake")

    got = resolve(TAG)
    assert got.parent == env["cache"] and got.is_dir()
    assert ":" not in got.name  # a tag is not a safe directory name as is
    # The archive's top directory is flattened: the release files sit at the root.
    for f in (*REQUIRED_FILES, "genes.txt"):
        assert (got / f).read_text() == (env["release"] / f).read_text()
    # Nothing else is left in the cache: no partial download, no temporary directory.
    assert sorted(p.name for p in env["cache"].iterdir()) == [got.name]

    # Second call: served from the cache, with no fetch at all (the source may even be gone).
    env["archive"].unlink()

    def no_fetch(url: str, dest: Path) -> None:
        raise AssertionError(f"fetched {url} again")

    monkeypatch.setattr(registry, "_fetch", no_fetch)
    assert resolve(TAG) == got


def test_wrong_sha256_is_a_clear_error_and_caches_nothing(env) -> None:
    _write_registry(env["registry"], [{"tag": TAG, "url": env["archive"].as_uri(), "sha256": "0" * 64}])
    with pytest.raises(ScaleError, match=r"sha256 .* the registry says 000000000000") as exc:
        resolve(TAG)
    assert "\n" not in str(exc.value)
    leftovers = list(env["cache"].iterdir()) if env["cache"].exists() else []
    assert leftovers == []


def test_sha256_is_compared_case_insensitively(env) -> None:
    _write_registry(env["registry"], [{"tag": TAG, "url": env["archive"].as_uri(), "sha256": env["sha"].upper()}])
    assert (resolve(TAG) / "model.safetensors").exists()


def test_unknown_tag_lists_the_registered_tags(env) -> None:
    with pytest.raises(ScaleError, match=r"unknown release 'nope:1'.*scale_fake:0\.1"):
        resolve("nope:1")


def test_local_directory_and_file_url_of_a_directory_resolve_to_themselves(env) -> None:
    rel = env["release"]
    assert resolve(str(rel)) == rel
    assert resolve(rel.as_uri()) == rel
    assert not env["cache"].exists()  # neither touched the cache


def test_file_url_of_a_missing_directory_is_an_error(env) -> None:
    with pytest.raises(ScaleError, match="not a release directory"):
        resolve((env["root"] / "absent").as_uri())


@pytest.mark.parametrize(
    "text",
    [
        "- tag: [unclosed\n",  # YAML syntax error
        "tag: a\nurl: b\nsha256: c\n",  # a mapping, not a list of entries
        "- just-a-string\n",
        "- tag: a\n  url: file:///x.tar.gz\n",  # no sha256
    ],
)
def test_malformed_registry_is_a_scale_error(env, text: str) -> None:
    env["registry"].write_text(text)
    with pytest.raises(ScaleError, match="registry"):
        resolve(TAG)


def test_registry_variable_pointing_nowhere_is_an_error(env, monkeypatch) -> None:
    monkeypatch.setenv(registry.ENV_REGISTRY, str(env["root"] / "missing.yaml"))
    with pytest.raises(ScaleError, match="does not exist"):
        registry.registry()


def test_packaged_registry_is_valid(monkeypatch) -> None:
    monkeypatch.delenv(registry.ENV_REGISTRY, raising=False)
    assert isinstance(registry.registry(), dict)


def test_missing_archive_is_a_scale_error(env) -> None:
    env["archive"].unlink()
    with pytest.raises(ScaleError, match="could not fetch"):
        resolve(TAG)
    assert not (env["cache"].exists() and any(env["cache"].iterdir()))


def test_archive_without_release_files_is_refused_and_not_cached(env) -> None:
    bad = _release_dir(env["root"] / "bad", files=("config.yaml",))
    archive = env["root"] / "bad.tar.gz"
    sha = pack(bad, archive)
    _write_registry(env["registry"], [{"tag": "bad:1", "url": archive.as_uri(), "sha256": sha}])
    with pytest.raises(ScaleError, match=r"lacks \['model.safetensors', 'vocab.json'\]"):
        resolve("bad:1")
    assert not (env["cache"].exists() and any(env["cache"].iterdir()))


def test_not_a_tar_archive_is_refused(env) -> None:
    blob = env["root"] / "blob.tar.gz"
    blob.write_bytes(b"not a tar file at all")
    sha = registry.sha256sum(blob)
    _write_registry(env["registry"], [{"tag": "blob:1", "url": blob.as_uri(), "sha256": sha}])
    with pytest.raises(ScaleError, match="not a tar archive"):
        resolve("blob:1")
    assert not (env["cache"].exists() and any(env["cache"].iterdir()))


def test_versions_of_one_name_get_separate_cache_entries(env) -> None:
    other = _release_dir(env["root"] / "v2", name="scale_fake-0.2")
    (other / "model.safetensors").write_text("version two\n")
    archive2 = env["root"] / "scale_fake-0.2.tar.gz"
    sha2 = pack(other, archive2)
    entries = yaml.safe_load(env["registry"].read_text())
    entries.append({"tag": "scale_fake:0.2", "url": archive2.as_uri(), "sha256": sha2})
    _write_registry(env["registry"], entries)
    a, b = resolve(TAG), resolve("scale_fake:0.2")
    assert a != b
    assert (a / "model.safetensors").read_text() == "contents of model.safetensors\n"
    assert (b / "model.safetensors").read_text() == "version two\n"


def test_required_files_match_the_release_format() -> None:
    from bionemo_scale.train.release import RELEASE_FILES

    assert tuple(REQUIRED_FILES) == tuple(RELEASE_FILES)
