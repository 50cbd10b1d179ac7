"""Bundle manifests: path safety, validation, round trip, diff, prune plan (tables + properties)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.bundle import manifest as bundle
from agent.bundle.manifest import FileEntry, Manifest
from agent.errors import IntegrityError

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def entry(path: str, sha: str = SHA_A, size: int = 1, mode: int = 0o644) -> FileEntry:
    return FileEntry(path, sha, size, mode)


@pytest.mark.parametrize("path", [
    "nginx.conf.j2", "a/b/c.txt", "agent.yaml", ".hidden", "a/.b", "x..y", "..x", "a b",
])
def test_safe_paths_pass(path: str) -> None:
    assert bundle.check_path(path) == path


@pytest.mark.parametrize("path,why", [
    ("/etc/passwd", "absolute"),
    ("../x", "'..'"),
    ("a/../../x", "'..'"),
    ("a/..", "'..'"),
    ("..", "'..'"),
    ("a//b", "empty"),
    ("a/./b", "'.'"),
    ("./a", "'.'"),
    ("a/", "empty"),
    ("", "non-empty"),
    ("a\\..\\b", "backslash"),
    ("a\x00b", "control"),
    ("a\nb", "control"),
    (".bundle/manifest.json", "reserved"),
    (".bundle", "reserved"),
    (None, "non-empty string"),
    (42, "non-empty string"),
    ("x" * 2000, "longer"),
])
def test_unsafe_paths_refused(path: object, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        bundle.check_path(path)


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c.j2", "/"]), min_size=1, max_size=6))
def test_any_accepted_path_stays_inside(parts: list[str]) -> None:
    """Whatever check_path accepts normalises to itself and never climbs out."""
    import posixpath

    path = "/".join(parts)
    try:
        bundle.check_path(path)
    except IntegrityError:
        return
    norm = posixpath.normpath(path)
    assert norm == path
    assert not norm.startswith("/") and not norm.startswith("..")


def manifest_doc(**over: object) -> dict:
    doc = {"format": 1, "version": 3, "created": 1700000000.5,
           "files": [{"path": "nginx.conf.j2", "sha256": SHA_A, "size": 10, "mode": "0644"}]}
    doc.update(over)
    return doc


def test_round_trip() -> None:
    m = bundle.build_manifest([entry("b/x", SHA_B, 5, 0o600), entry("a", SHA_A, 3)], None, 12.0)
    assert m.version == 1
    assert [f.path for f in m.files] == ["a", "b/x"]
    again = bundle.parse_manifest(m.to_bytes())
    assert again == m
    assert json.loads(m.to_bytes())["files"][1]["mode"] == "0600"


def test_version_is_monotonic() -> None:
    m1 = bundle.build_manifest([entry("a")], None, 1.0)
    m2 = bundle.build_manifest([entry("a", SHA_B)], m1, 2.0)
    assert (m1.version, m2.version) == (1, 2)


@pytest.mark.parametrize("over,why", [
    ({"version": 0}, "version"),
    ({"version": "3"}, "version"),
    ({"version": True}, "version"),
    ({"format": 2}, "format"),
    ({"files": {}}, "files must be a list"),
    ({"created": "yesterday"}, "created"),
    ({"files": [{"path": "../x", "sha256": SHA_A, "size": 1}]}, r"\.\."),
    ({"files": [{"path": "/etc/x", "sha256": SHA_A, "size": 1}]}, "absolute"),
    ({"files": [{"path": "a", "sha256": "xyz", "size": 1}]}, "sha256"),
    ({"files": [{"path": "a", "sha256": SHA_A.upper(), "size": 1}]}, "sha256"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": -1}]}, "size"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1.5}]}, "size"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1, "mode": "rwx"}]}, "mode"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1, "mode": 0o17777}]}, "mode"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1, "extra": 1}]}, "unknown keys"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1},
                {"path": "a", "sha256": SHA_B, "size": 1}]}, "listed twice"),
    ({"files": [{"path": "a", "sha256": SHA_A, "size": 1},
                {"path": "a/b", "sha256": SHA_B, "size": 1}]}, "both a file and a directory"),
    ({"files": ["a"]}, "expected an object"),
])
def test_bad_manifests_refused(over: dict, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        bundle.manifest_from_dict(manifest_doc(**over))


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"\xff\xfe"])
def test_garbage_manifest_refused(body: bytes) -> None:
    with pytest.raises(IntegrityError):
        bundle.parse_manifest(body)


def test_diff_table() -> None:
    old = Manifest(1, 0, (entry("keep"), entry("change", SHA_A), entry("chmod", mode=0o644),
                          entry("gone")))
    new = Manifest(2, 0, (entry("keep"), entry("change", SHA_B), entry("chmod", mode=0o600),
                          entry("new", SHA_C)))
    d = bundle.diff(old, new)
    assert d.added == ("new",)
    assert d.removed == ("gone",)
    assert d.changed == ("change", "chmod")
    assert d.paths == ("change", "chmod", "gone", "new")
    assert not bundle.diff(new, new)
    assert bundle.diff(None, new).added == tuple(sorted(f.path for f in new.files))


files_st = st.dictionaries(
    st.sampled_from(["a", "b", "c/d", "e.j2", "f/g/h"]),
    st.tuples(st.sampled_from([SHA_A, SHA_B, SHA_C]), st.sampled_from([0o644, 0o600])),
    max_size=5,
).map(lambda d: Manifest(1, 0, tuple(entry(p, s, 1, m) for p, (s, m) in sorted(d.items()))))


@given(files_st, files_st)
def test_diff_properties(a: Manifest, b: Manifest) -> None:
    d = bundle.diff(a, b)
    pa, pb = set(a.by_path()), set(b.by_path())
    assert set(d.added) == pb - pa and set(d.removed) == pa - pb
    assert set(d.changed) <= pa & pb
    assert bool(d) == (not b.same_content(a))
    assert set(bundle.diff(b, a).added) == set(d.removed)


def test_missing_dedupes_content() -> None:
    m = Manifest(1, 0, (entry("a", SHA_A), entry("b", SHA_A), entry("c", SHA_B)))
    assert [e.sha256 for e in bundle.missing(m, [])] == [SHA_A, SHA_B]
    assert [e.sha256 for e in bundle.missing(m, [SHA_A])] == [SHA_B]
    assert bundle.missing(m, [SHA_A, SHA_B]) == ()


@pytest.mark.parametrize("versions,keep,protect,doomed", [
    (["01", "02", "03", "04"], 2, [], ["01", "02"]),
    (["01", "02", "03", "04"], 2, ["01"], ["02"]),
    (["01", "02"], 3, [], []),
    (["01", "02", "03"], 1, ["02"], ["01"]),
    ([], 3, [], []),
])
def test_prune_plan(versions: list[str], keep: int, protect: list[str], doomed: list[str]) -> None:
    assert list(bundle.plan_prune(versions, keep, protect)) == doomed


@pytest.mark.parametrize("group,ok", [
    ("web", True), ("web-1.prod_x", True), ("", False), ("a/b", False), ("..", False),
    ("x" * 65, False),
])
def test_group_names(group: str, ok: bool) -> None:
    if ok:
        assert bundle.check_group(group) == group
    else:
        with pytest.raises(IntegrityError):
            bundle.check_group(group)


def test_keys() -> None:
    assert bundle.manifest_rel("web") == "config/web/manifest.json"
    assert bundle.object_rel("web", SHA_A) == f"config/web/objects/{SHA_A}"
