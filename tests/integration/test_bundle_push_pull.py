"""bundle push / pull against a real moto server: content addressing, CAS, verification, lkg."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from agent.aws.store import NotModified, Store
from agent.bootctx import Phase
from agent.bundle import manifest as bundle
from agent.bundle import pull
from agent.bundle.publish import collect, push
from agent.errors import IntegrityError, NotFound, PreconditionFailed

GROUP = "web"


@pytest.fixture
def store(moto) -> Store:
    s = Store("fleet-bucket", "prod")
    s.ensure_bucket()
    return s


def write_tree(d: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return d


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "bundle", {
        "nginx.conf.j2": "listen {{ vars.port }};\n",
        "app.env.j2": "GROUP={{ group }}\n",
        "static/index.html": "<h1>hi</h1>\n",
        "static/copy.html": "<h1>hi</h1>\n",  # same content: one object
    })


def bundles(root: Path) -> Path:
    return root / "var/lib/ec2-agent/bundles"


def object_keys(store: Store) -> set[str]:
    return {e.key.rsplit("/", 1)[-1] for e in store.list(bundle.objects_prefix(GROUP)).entries}


def test_push_is_content_addressed_and_idempotent(store: Store, src: Path) -> None:
    r1 = push(store, GROUP, src)
    assert (r1.version, r1.files, r1.uploaded, r1.already_stored) == (1, 4, 3, 0)
    assert len(object_keys(store)) == 3
    again = push(store, GROUP, src)
    assert again.unchanged and again.version == 1
    puts_before = store.usage.requests["put"]
    (src / "app.env.j2").write_text("GROUP={{ group }}\nX=1\n")
    r2 = push(store, GROUP, src)
    assert (r2.version, r2.previous_version, r2.uploaded, r2.already_stored) == (2, 1, 1, 2)
    assert store.usage.requests["put"] - puts_before == 2  # one object + the manifest
    m = bundle.parse_manifest(store.get(bundle.manifest_rel(GROUP)).body)
    assert m.version == 2 and [f.path for f in m.files] == sorted(
        ["nginx.conf.j2", "app.env.j2", "static/index.html", "static/copy.html"])
    for f in m.files:
        body = store.get(bundle.object_rel(GROUP, f.sha256)).body
        assert hashlib.sha256(body).hexdigest() == f.sha256 and len(body) == f.size


def test_push_refuses_symlink_escape_and_bad_agent_yaml(store: Store, tmp_path: Path) -> None:
    d = write_tree(tmp_path / "b", {"a.j2": "x"})
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", d / "link")
    with pytest.raises(IntegrityError, match="outside"):
        push(store, GROUP, d)
    os.unlink(d / "link")
    os.symlink("a.j2", d / "inside-link")  # a link inside the bundle is its content
    assert {e.path for e, _ in collect(d)} == {"a.j2", "inside-link"}
    (d / "agent.yaml").write_text("store: {bucket: other}\n")
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="store"):
        push(store, GROUP, d)
    assert store.get_or_none(bundle.manifest_rel(GROUP)) is None


class RacingStore(Store):
    """Both pushes read the same manifest, then meet at the barrier before committing."""

    barrier: threading.Barrier

    def list(self, rel_prefix: str, **kw):  # type: ignore[override]
        out = super().list(rel_prefix, **kw)
        self.barrier.wait(timeout=20)
        return out


@pytest.mark.parametrize("first", [True, False], ids=["first-version", "later-version"])
def test_two_racing_pushes_one_wins_the_other_is_told(moto, tmp_path: Path, src: Path,
                                                      first: bool) -> None:
    Store("fleet-bucket", "prod").ensure_bucket()
    if not first:
        push(Store("fleet-bucket", "prod"), GROUP, src)
    barrier = threading.Barrier(2)
    dirs = [write_tree(tmp_path / f"p{i}", {"who.txt": f"pusher {i}\n"}) for i in range(2)]
    results: list[object] = [None, None]

    def run(i: int) -> None:
        s = RacingStore("fleet-bucket", "prod")
        s.barrier = barrier
        try:
            results[i] = push(s, GROUP, dirs[i])
        except Exception as exc:  # noqa: BLE001 - the loser's error is the assertion
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [r for r in results if isinstance(r, Exception)]
    wins = [r for r in results if not isinstance(r, Exception)]
    assert len(errors) == 1 and len(wins) == 1, results
    assert isinstance(errors[0], PreconditionFailed)
    assert "lost a race" in str(errors[0]) and "push again" in str(errors[0])
    expected_version = 1 if first else 2
    assert wins[0].version == expected_version  # type: ignore[attr-defined]
    s = Store("fleet-bucket", "prod")
    m = bundle.parse_manifest(s.get(bundle.manifest_rel(GROUP)).body)
    assert m.version == expected_version
    winner = results.index(wins[0])
    (who,) = [f for f in m.files if f.path == "who.txt"]
    assert who.sha256 == hashlib.sha256(f"pusher {winner}\n".encode()).hexdigest()


def test_pull_assembles_switches_and_keeps_lkg(store: Store, src: Path, root: Path) -> None:
    push(store, GROUP, src)
    bd = bundles(root)
    seen: list[dict] = []
    r1 = pull.pull(store, GROUP, bd, keep=2, progress=seen.append)
    assert r1.switched and r1.version == 1 and r1.downloaded == 3 and r1.cached == 0
    cur = bd / "current"
    assert cur.is_symlink() and (cur / "nginx.conf.j2").read_text() == "listen {{ vars.port }};\n"
    assert (cur / "static/copy.html").read_text() == "<h1>hi</h1>\n"
    assert seen and seen[-1]["bytes"] == seen[-1]["total"] > 0
    assert pull.local_version(bd, "lkg") is None
    # Same version again: nothing downloaded, nothing switched.
    same = pull.pull(store, GROUP, bd, keep=2)
    assert not same.switched and same.downloaded == 0
    (src / "nginx.conf.j2").write_text("listen {{ vars.port }} ssl;\n")
    os.chmod(src / "app.env.j2", 0o600)
    push(store, GROUP, src)
    gets = store.usage.requests["get"]
    r2 = pull.pull(store, GROUP, bd, keep=2)
    assert r2.version == 2 and r2.downloaded == 1 and r2.cached == 2
    assert store.usage.requests["get"] - gets <= 2  # manifest + the one changed object
    assert (cur / "nginx.conf.j2").read_text() == "listen {{ vars.port }} ssl;\n"
    assert (cur / "app.env.j2").stat().st_mode & 0o777 == 0o600
    lkg = pull.local_version(bd, "lkg")
    assert lkg is not None and lkg.manifest.version == 1
    assert pull.local_version(bd, "current").manifest.version == 2
    # More versions: only `keep` stay, never current or lkg, and the cache follows.
    for i in range(3):
        (src / "n.txt").write_text(f"n{i}")
        push(store, GROUP, src)
        pull.pull(store, GROUP, bd, keep=2)
    names = sorted(p.name for p in (bd / "versions").iterdir())
    assert len(names) == 2
    assert names[-1].startswith("0000000005-") and names[0].startswith("0000000004-")
    live = {f.sha256 for f in pull.local_version(bd, "current").manifest.files}
    live |= {f.sha256 for f in pull.local_version(bd, "lkg").manifest.files}
    assert {p.name for p in (bd / "objects").iterdir()} == live
    assert not list(bd.glob(".staging-*"))


def _put_manifest(store: Store, doc: dict) -> None:
    store.put(bundle.manifest_rel(GROUP), json.dumps(doc).encode())


@pytest.mark.parametrize("path", ["../evil", "/etc/evil", "a/../../evil", ".bundle/etag"])
def test_unsafe_manifest_path_writes_nothing(store: Store, root: Path, path: str) -> None:
    body = b"pwned"
    sha = hashlib.sha256(body).hexdigest()
    store.put(bundle.object_rel(GROUP, sha), body)
    _put_manifest(store, {"version": 1, "created": 0,
                          "files": [{"path": path, "sha256": sha, "size": 5, "mode": "0644"}]})
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(IntegrityError):
        pull.pull(store, GROUP, bundles(root))
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert not (root.parent / "evil").exists()


def test_symlink_on_the_way_is_refused(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    os.symlink(tmp_path, staging / "a")
    with pytest.raises(IntegrityError, match="symlink"):
        pull._safe_parent(staging, "a/b/c")


@pytest.mark.parametrize("damage,error,match", [
    ("replace", IntegrityError, "checksum mismatch"),
    ("truncate", IntegrityError, "truncated"),
    ("delete", NotFound, "missing"),
])
def test_bad_objects_refused_current_untouched(store: Store, src: Path, root: Path,
                                               damage: str, error: type, match: str) -> None:
    push(store, GROUP, src)
    bd = bundles(root)
    pull.pull(store, GROUP, bd)
    (src / "nginx.conf.j2").write_text("version two, longer than before\n")
    push(store, GROUP, src)
    sha = hashlib.sha256(b"version two, longer than before\n").hexdigest()
    key = bundle.object_rel(GROUP, sha)
    if damage == "replace":
        store.put(key, b"version TWO, longer than before\n")
    elif damage == "truncate":
        store.put(key, b"version two")
    else:
        store.delete(key)
    with pytest.raises(error, match=match):
        pull.pull(store, GROUP, bd)
    cur = pull.local_version(bd, "current")
    assert cur is not None and cur.manifest.version == 1
    assert (bd / "current/nginx.conf.j2").read_text() == "listen {{ vars.port }};\n"
    assert not (bd / "objects" / sha).exists()
    assert not list(bd.glob(".staging-*")) and not list((bd / "objects").glob(".dl-*"))


def test_corrupt_local_cache_is_refetched(store: Store, src: Path, root: Path) -> None:
    push(store, GROUP, src)
    bd = bundles(root)
    pull.pull(store, GROUP, bd)
    m = pull.local_version(bd, "current").manifest
    victim = bd / "objects" / m.by_path()["nginx.conf.j2"].sha256
    victim.write_bytes(b"bit rot")
    (src / "app.env.j2").write_text("changed\n")
    push(store, GROUP, src)
    r = pull.pull(store, GROUP, bd)
    assert r.downloaded == 2  # the changed file and the rotten cache entry
    assert (bd / "current/nginx.conf.j2").read_text() == "listen {{ vars.port }};\n"


def test_poll_is_a_conditional_get(store: Store, src: Path, root: Path) -> None:
    with pytest.raises(NotFound):
        pull.poll(store, GROUP, None)
    push(store, GROUP, src)
    remote = pull.poll(store, GROUP, None)
    assert isinstance(remote, pull.Remote) and remote.manifest.version == 1
    assert isinstance(pull.poll(store, GROUP, remote.etag), NotModified)
    (src / "new.txt").write_text("x")
    push(store, GROUP, src)
    again = pull.poll(store, GROUP, remote.etag)
    assert isinstance(again, pull.Remote) and again.manifest.version == 2


def test_accept_can_refuse_before_switch(store: Store, src: Path, root: Path) -> None:
    push(store, GROUP, src)
    bd = bundles(root)
    pull.pull(store, GROUP, bd)
    (src / "x").write_text("x")
    push(store, GROUP, src)

    def refuse(staged: Path, remote: pull.Remote) -> None:
        assert (staged / "x").read_text() == "x"
        raise IntegrityError("no thanks")

    with pytest.raises(IntegrityError, match="no thanks"):
        pull.pull(store, GROUP, bd, accept=refuse)
    assert pull.local_version(bd, "current").manifest.version == 1
    assert len(list((bd / "versions").iterdir())) == 1


# -- boot phases and the change watch, end to end ----------------------------------------------



def _phases_to_render() -> list[Phase]:
    from agent.boot.run import PHASES

    names = [p.name for p in PHASES]
    return list(PHASES[: names.index("render") + 1])


def _bundle_with_reloads(d: Path, log: Path, nginx: str = "listen {{ vars.port }};\n") -> Path:
    return write_tree(d, {
        "nginx.conf.j2": nginx,
        "app.env.j2": "GROUP={{ group }}\nID={{ instance.id }}\n",
        "agent.yaml": (
            "vars: {port: 8080}\n"
            "templates:\n"
            f"  - {{src: nginx.conf.j2, dest: /etc/nginx/nginx.conf, "
            f"reload: 'echo nginx >> {log}'}}\n"
            f"  - {{src: app.env.j2, dest: /etc/app/app.env, reload: 'echo app >> {log}'}}\n"
        ),
    })


def _phase(st: dict, name: str) -> dict:
    return next(p for p in st["phases"] if p["name"] == name)


def test_boot_pull_render_then_refresh_reloads_only_what_changed(cloud, instance,
                                                                  tmp_path: Path) -> None:
    from agent.boot.instance import load_context
    from agent.boot.run import run_boot
    from agent.paths import Paths

    log = tmp_path / "reloads.log"
    src = _bundle_with_reloads(tmp_path / "b", log)
    s = Store(cloud.bucket, cloud.prefix)
    push(s, "web", src)
    paths = Paths(instance.root)
    st = run_boot(paths)
    assert st["status"] == "done", st["errors"]
    assert _phase(st, "pull")["status"] == "ok" and "version 1" in _phase(st, "pull")["detail"]
    assert paths.rooted("/etc/nginx/nginx.conf").read_text() == "listen 8080;\n"
    assert paths.rooted("/etc/app/app.env").read_text() == (
        f"GROUP=web\nID={instance.instance_id}\n")
    assert log.read_text().split() == ["nginx", "app"]

    ctx = load_context(paths)
    assert pull.refresh(ctx, store=s).status == "not-modified"
    (src / "nginx.conf.j2").write_text("listen {{ vars.port }} reuseport;\n")
    push(s, "web", src)
    res = pull.refresh(ctx, store=s)
    assert res.status == "updated", res.error
    assert (res.version, res.previous_version, res.changed_paths) == (2, 1, ("nginx.conf.j2",))
    assert res.reloaded == (f"echo nginx >> {log}",)
    assert log.read_text().split() == ["nginx", "app", "nginx"]  # app not reloaded
    assert paths.rooted("/etc/nginx/nginx.conf").read_text() == "listen 8080 reuseport;\n"
    assert pull.refresh(ctx, store=s).status == "not-modified"
    # A vars change in the bundle's agent.yaml re-renders through the new config.
    (src / "agent.yaml").write_text((src / "agent.yaml").read_text().replace("8080", "9090"))
    push(s, "web", src)
    res = pull.refresh(ctx, store=s)
    assert res.status == "updated" and res.config.vars["port"] == 9090
    assert log.read_text().split() == ["nginx", "app", "nginx", "nginx"]
    # Reboot: the manifest is unchanged, nothing is downloaded, nothing reloaded.
    import os as _os

    _os.environ["EC2_AGENT_BOOT_ID"] = "second-kernel-boot"
    try:
        st2 = run_boot(paths)
    finally:
        del _os.environ["EC2_AGENT_BOOT_ID"]
    assert st2["status"] == "done", st2["errors"]
    assert "unchanged" in _phase(st2, "pull")["detail"]
    assert log.read_text().split() == ["nginx", "app", "nginx", "nginx"]


def _bake(paths, cfg: dict) -> None:
    import yaml

    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text(yaml.safe_dump(cfg))


def test_store_down_at_boot_uses_lkg_within_deadline(cloud, instance, tmp_path: Path) -> None:
    import time as _time

    from agent.boot.run import run_boot
    from agent.paths import Paths

    log = tmp_path / "reloads.log"
    push(Store(cloud.bucket, cloud.prefix), "web", _bundle_with_reloads(tmp_path / "b", log))
    paths = Paths(instance.root)
    phases = _phases_to_render()
    t0 = _time.monotonic()
    assert run_boot(paths, phases=phases)["status"] == "done"
    base = _time.monotonic() - t0  # this machine's healthy boot, now (a baseline: issue #16)
    # The deadline is sized from the baseline, so the work after the pull (render) fits in
    # what the pull leaves (half: it has a last-known-good) even on a busy machine.
    deadline = max(8.0, 4 * base)
    _bake(paths, {"boot": {"deadline_s": deadline}})
    cloud.moto.pause()  # S3 hangs: connections accepted, never answered
    try:
        t0 = _time.monotonic()
        st = run_boot(paths, phases=phases)
        took = _time.monotonic() - t0
    finally:
        cloud.moto.resume()
    assert st["status"] == "degraded", st
    p = _phase(st, "pull")
    assert p["status"] == "degraded"
    assert "bundle: using last-known-good version 1" in p["detail"]
    assert any("last-known-good" in d for d in st["degraded"])
    assert _phase(st, "render")["status"] == "ok"
    # The boot deadline held: the hung store cost at most the deadline on top of the work a
    # healthy boot does (botocore's own timeouts would have waited minutes).
    assert took < deadline + 2 * base + 2, (took, deadline, base)
    assert paths.rooted("/etc/nginx/nginx.conf").read_text() == "listen 8080;\n"


def test_store_down_without_lkg_is_an_error(cloud, instance, tmp_path: Path) -> None:
    from agent.boot.run import run_boot
    from agent.paths import Paths

    paths = Paths(instance.root)
    _bake(paths, {"boot": {"deadline_s": 6}})
    cloud.moto.pause()
    try:
        st = run_boot(paths, phases=_phases_to_render())
    finally:
        cloud.moto.resume()
    assert st["status"] == "error"
    p = _phase(st, "pull")
    assert p["status"] == "error" and "no last-known-good" in p["detail"]
    assert _phase(st, "render")["status"] == "skipped"


def test_bad_bundle_agent_yaml_is_an_error_naming_the_layer(cloud, instance,
                                                            tmp_path: Path) -> None:
    from agent.boot.run import run_boot
    from agent.paths import Paths

    s = Store(cloud.bucket, cloud.prefix)
    log = tmp_path / "reloads.log"
    src = _bundle_with_reloads(tmp_path / "b", log)
    push(s, "web", src)
    paths = Paths(instance.root)
    assert run_boot(paths, phases=_phases_to_render())["status"] == "done"
    # Published behind push's back (push validates agent.yaml itself).
    (src / "agent.yaml").write_text("heartbeat: {interval_s: -1}\n")
    from agent.bundle.publish import collect

    files = collect(src)
    for e, data in files:
        s.put(bundle.object_rel("web", e.sha256), data)
    prev = pull.fetch_manifest(s, "web")
    m = bundle.build_manifest([e for e, _ in files], prev.manifest, 0.0)
    s.put(bundle.manifest_rel("web"), m.to_bytes(), if_match=prev.etag)
    st = run_boot(paths, phases=_phases_to_render())
    assert st["status"] == "error"
    p = _phase(st, "pull")
    assert p["status"] == "error" and "bundle agent.yaml" in p["detail"]
    assert "heartbeat.interval_s" in p["detail"]
    assert pull.local_version(paths.bundles_dir, "current").manifest.version == 1


def test_cli_bundle_push(store: Store, src: Path, root: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    assert main(["bundle", "push", str(src), "--group", GROUP, "--bucket", "fleet-bucket",
                 "--prefix", "prod"]) == 0
    assert "published version 1" in capsys.readouterr().out
    cfg = root / "etc/ec2-agent/agent.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("group: web\nstore: {bucket: fleet-bucket, prefix: prod}\n")
    assert main(["bundle", "push", str(src)]) == 0  # defaults from the local config
    assert "unchanged, still version 1" in capsys.readouterr().out
    cfg.unlink()
    assert main(["bundle", "push", str(src)]) == 1
    assert "--group" in capsys.readouterr().err
