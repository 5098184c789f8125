"""The fxmark harness: every workload on the engine, on a directory and through a
pnova mount; the checks that turn wrong contents into failed runs; failure
reporting; report and plot on recorded results.

Throughput numbers are only checked for sanity (positive, consistent with the
op counts and elapsed times), never compared with each other: timings depend
on the machine.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import statistics
import time
from pathlib import Path

import pytest

from fxmark import cli, results, workloads
from fxmark.fileops import EngineOps, PosixOps
from fxmark.mount_target import fstype_of
from fxmark.progress import Progress
from fxmark.workers import (PoolResult, WorkerResult, cpu_breakdown, run_workers,
                            summarise)
from fxmark.workloads import WORKLOADS
from pnova.engine import FileSystem
from pnova.mkfs import format_device

DURATION = 0.3
KEYS = {"workload", "target", "scheme", "workers", "ops", "seconds", "ops_per_sec", "cpu",
        "worker_cpu", "worker_ops", "worker_seconds", "direct"}


@pytest.fixture
def fast_dir(tmp_path):
    """A temporary directory in RAM (tmpfs) where there is one: many files, quickly."""
    import shutil
    import tempfile
    if os.access("/dev/shm", os.W_OK | os.X_OK):
        d = tempfile.mkdtemp(prefix="fxmark-test-", dir="/dev/shm")
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path / "fast")


def _run(tmp_path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "out"
    rc = cli.main(["run", "--duration", str(DURATION), "--out", str(out),
                   "--image-dir", str(tmp_path), "--no-progress", *args])
    path = out / "results.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return rc, recs


def _sane(r: dict, workload: str, target: str, scheme: str) -> None:
    assert "failed" not in r, r["failed"]
    assert KEYS <= r.keys()
    assert (r["workload"], r["target"], r["scheme"]) == (workload, target, scheme)
    assert r["ops"] > 0 and r["ops"] == sum(r["worker_ops"])
    assert len(r["worker_ops"]) == r["workers"]
    assert all(n > 0 for n in r["worker_ops"])
    # Each worker measured about the duration (replenishing is not counted).
    assert all(0.9 * DURATION <= s <= DURATION + 1.0 for s in r["worker_seconds"])
    assert r["ops_per_sec"] == pytest.approx(r["ops"] / r["seconds"])
    cpu = r["cpu"]
    assert {"user", "sys", "idle"} <= cpu.keys()
    assert all(0.0 <= v <= 1.0 for v in cpu.values())
    assert sum(cpu.values()) == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------ every workload
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_workload_on_the_engine(tmp_path, name, capsys):
    rc, recs = _run(tmp_path, "--target", "engine", "--workload", name, "--scheme", "pnova",
                    "--workers", "2")
    assert rc == 0, capsys.readouterr().out
    [r] = recs
    _sane(r, name, "engine", "pnova")
    assert not any(p.name.startswith("fxmark-") for p in tmp_path.iterdir())   # cleaned up


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_workload_on_the_engine_apart(tmp_path, name, capsys):
    rc, recs = _run(tmp_path, "--target", "engine-apart", "--workload", name,
                    "--scheme", "pnova", "--workers", "2")
    assert rc == 0, capsys.readouterr().out
    [r] = recs
    _sane(r, name, "engine-apart", "pnova")
    assert r["images"] == 2
    assert not any(p.name.startswith("fxmark-") for p in tmp_path.iterdir())   # cleaned up


def test_engine_apart_gives_each_worker_an_image_of_its_own(tmp_path, capsys):
    # Each worker works on its own image as the one worker of that image: the
    # shared directory of MWCM holds exactly one worker's files on each.
    rc, recs = _run(tmp_path, "--target", "engine-apart", "--workload", "MWCM",
                    "--scheme", "pnova", "--workers", "2", "--keep")
    assert rc == 0, capsys.readouterr().out
    [r] = recs
    assert len(r["image"]) == 2 and len(set(r["image"])) == 2
    for image, ops in zip(r["image"], r["worker_ops"]):
        fs = FileSystem.mount(image, cpu=0)
        try:
            names = {n for n in EngineOps(fs).listdir("") if n.startswith("m-")}
        finally:
            fs.unmount()
        assert names == {f"m-0-{i}" for i in range(1, ops + 1)}


@pytest.mark.parametrize("name", ["MWUL", "MWUM", "MWRM"])
def test_engine_workers_stock_their_own_files_on_their_own_cpu(tmp_path, name, capsys):
    # As FxMark's pre_work, each worker creates the files it uses up itself,
    # as the logical CPU it is: their inodes are in its own inode table (the
    # CPU an inode number belongs to), not all made by the preparing CPU 0.
    rc, recs = _run(tmp_path, "--target", "engine", "--workload", name, "--scheme", "pnova",
                    "--workers", "2", "--keep")
    assert rc == 0, capsys.readouterr().out
    [r] = recs
    _sane(r, name, "engine", "pnova")
    # how many is timed (see test_a_stock_follows_the_fastest_pool); whole pools
    # within the device's sizing, in any case
    limit = workloads._stock_limit(DURATION)
    assert all(0 < n <= limit and n % workloads.POOL == 0 for n in r["worker_stocked"])
    fs = FileSystem.mount(r["image"], cpu=0)
    try:
        seen = {0: 0, 1: 0}
        for wid in range(2):
            d = "" if name == "MWUM" else str(wid)
            dino = fs.lookup_ino(1, d.encode()) if d else 1
            for entry, ino, _ in fs.readdir(dino):
                if entry.startswith(b"u-%d-" % wid if name != "MWUL" else b"u-"):
                    assert (ino - 1) % fs.ncpus == wid, (entry, ino)
                    seen[wid] += 1
        assert seen[0] > 0 and seen[1] > 0       # files were left unused to look at
    finally:
        fs.unmount()
        os.unlink(r["image"])


def test_wrong_contents_of_one_apart_image_fail_the_run(tmp_path, monkeypatch, capsys):
    # every image is checked: damage found on the second fails the run and names it
    calls = []

    def check(*a):
        calls.append(a)
        return "page 0 is not what was written" if len(calls) == 2 else None
    monkeypatch.setitem(WORKLOADS, "DWOL", dataclasses.replace(workloads.DWOL, check=check))
    rc, recs = _run(tmp_path, "--target", "engine-apart", "--workload", "DWOL",
                    "--scheme", "pnova", "--workers", "2")
    assert rc == 1
    [r] = recs
    assert r["failed"] == ("wrong contents of worker 1's image after the run: "
                           "page 0 is not what was written")
    assert [a[2:] for a in calls] == [(1, [r["worker_ops"][0]]), (1, [r["worker_ops"][1]])]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_workload_on_a_directory(tmp_path, fast_dir, name, capsys):
    d = Path(fast_dir) / "dir"
    d.mkdir(parents=True)
    rc, recs = _run(tmp_path, "--target", f"local={d}", "--workload", name, "--workers", "2")
    assert rc == 0, capsys.readouterr().out
    [r] = recs
    _sane(r, name, "local", "-")
    assert r["path"] == str(d) and r["fstype"]
    assert list(d.iterdir()) == []                  # the run directory was removed


@pytest.mark.mount
def test_pnova_mount_target(tmp_path, capsys):
    rc, recs = _run(tmp_path, "--target", "pnova", "--workload", "DWOM,MWCL",
                    "--scheme", "inode,pnova", "--workers", "1,2")
    table = capsys.readouterr().out
    assert rc == 0, table
    assert [(r["workload"], r["scheme"], r["workers"]) for r in recs] == [
        (w, s, n) for w in ("DWOM", "MWCL") for s in ("inode", "pnova") for n in (1, 2)]
    for r in recs:
        _sane(r, r["workload"], "pnova", r["scheme"])
        # the type says the image's backing (DESIGN 24)
        memory = fstype_of(str(tmp_path)) in ("tmpfs", "ramfs")
        assert r["fstype"] == ("fuse.pnova-memory" if memory else "fuse.pnova")
    assert not any(p.name.startswith("fxmark-") for p in tmp_path.iterdir())


@pytest.mark.mount
def test_pnova_mount_targets_say_how_requests_came(tmp_path, capsys):
    """'pnova' takes its requests through FUSE over io_uring where the kernel
    offers it, 'pnova-devfuse' always reads /dev/fuse; each record and the
    printed summary say which path served the run."""
    from pnova.fuse_session import uring_offered
    rc, recs = _run(tmp_path, "--target", "pnova", "--target", "pnova-devfuse",
                    "--workload", "MWCL", "--scheme", "pnova", "--workers", "1,2")
    out = capsys.readouterr().out
    assert rc == 0, out
    how = "io_uring" if uring_offered() else "/dev/fuse"
    assert [(r["target"], r["workers"], r["requests"]) for r in recs] == [
        ("pnova", 1, how), ("pnova", 2, how),
        ("pnova-devfuse", 1, "/dev/fuse"), ("pnova-devfuse", 2, "/dev/fuse")]
    for r in recs:
        _sane(r, "MWCL", r["target"], "pnova")
    assert f"pnova: requests taken through {how}" in out
    assert "pnova-devfuse: requests taken through /dev/fuse" in out


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting without fusermount3 needs root")
def test_pnova_mount_target_as_root_needs_no_fusermount3(tmp_path, monkeypatch, capsys):
    """As root the harness unmounts with umount2, as pnova mounts with mount(2): a
    machine without the fuse3 package's helper runs it (it once failed there
    after every measurement)."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, recs = _run(tmp_path, "--target", "pnova", "--workload", "DWOL", "--scheme", "pnova",
                    "--workers", "1")
    assert rc == 0, capsys.readouterr().out
    _sane(recs[0], "DWOL", "pnova", "pnova")


def test_targets_side_by_side_with_direct_io(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rc, recs = _run(tmp_path, "--target", "engine", "--target", f"one={a}",
                    "--target", f"two={b}", "--workload", "DWOL", "--scheme", "segment",
                    "--workers", "1", "--direct")
    out = capsys.readouterr().out
    if rc != 0 and "Invalid argument" in out:
        pytest.fail(f"O_DIRECT refused on {tmp_path}'s filesystem: {out}")
    assert rc == 0, out
    assert [(r["target"], r["scheme"]) for r in recs] == [
        ("engine", "segment"), ("one", "-"), ("two", "-")]
    assert all(r["direct"] for r in recs)


# ------------------------------------------------------------------ checks bite
SMALL = {"POOL": 8, "DWAL_WRAP": 4 * workloads.PAGE, "DWTL_PAGES": 6,
         "DWBL_WRAP": 4 * workloads.MiB}
OPS = [3, 20]                  # crosses the small pool / wrap / regrow sizes above


def _drive(monkeypatch, base: str, name: str):
    """Prepare a workload for 2 workers and run OPS[k] ops of worker k, in this process."""
    for k, v in SMALL.items():
        monkeypatch.setattr(workloads, k, v)
    w = WORKLOADS[name]
    fops = PosixOps(str(base))
    shared = w.prepare(fops, 2)
    for wid, n in enumerate(OPS):
        op = w.worker(fops, shared, wid)
        for seq in range(1, n + 1):
            op(seq)
    return w, fops, shared


def _spoil(name: str, base: str) -> None:
    """Damage what a read-only workload's check looks at."""
    if name.startswith("DRB"):
        path = {"DRBL": "0/drbl.dat", "DRBM": "drbm.dat", "DRBH": "drbh.dat"}[name]
        with open(os.path.join(base, path), "r+b") as f:
            f.seek(20)
            f.write(b"?")
    elif name == "MRPL":
        os.unlink(os.path.join(base, "1/0/0/0/0"))
    elif name in ("MRPM", "MRPH"):
        os.unlink(os.path.join(base, "0/0/0/0/0"))
        for p in workloads._random_paths(0)[:1]:
            if os.path.exists(os.path.join(base, p)):
                os.unlink(os.path.join(base, p))
    else:                                           # MRDL / MRDM
        os.unlink(os.path.join(base, "1/d-7" if name == "MRDL" else "d-7"))


READ_ONLY = {"DRBL", "DRBM", "DRBH", "MRPL", "MRPM", "MRPH", "MRDL", "MRDM"}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_check_accepts_the_truth_and_rejects_damage(monkeypatch, fast_dir, name):
    os.makedirs(fast_dir, exist_ok=True)
    w, fops, shared = _drive(monkeypatch, fast_dir, name)
    assert w.check(fops, shared, 2, OPS) is None
    if name in READ_ONLY:
        _spoil(name, fast_dir)
        assert w.check(fops, shared, 2, OPS) is not None
    else:
        # One op more or fewer than happened is not what is on the target.
        assert w.check(fops, shared, 2, [OPS[0] + 1, OPS[1]]) is not None
        assert w.check(fops, shared, 2, [OPS[0], OPS[1] - 1]) is not None


def test_engine_ops_match_posix_ops(tmp_path):
    """The same ops give the same tree on the engine as through system calls."""
    img = str(tmp_path / "img")
    format_device(img, 64 << 20, numa_nodes=1, cpus_per_node=1)
    fs = FileSystem.mount(img)
    try:
        e, p = EngineOps(fs), PosixOps(str(tmp_path / "d"))
        os.mkdir(tmp_path / "d")
        for ops in (e, p):
            ops.mkdir("x")
            h = ops.create("x/f", data=True)
            buf = ops.buffer(4096)
            buf[:5] = b"hello"
            assert ops.pwrite(h, buf, 8192) == 4096
            ops.ftruncate(h, 8192 + 5)
            ops.rename("x/f", "g")
            assert sorted(ops.listdir("")) == ["g", "x"] and ops.listdir("x") == []
            assert ops.size(h) == 8197
            got = ops.buffer(4096)
            assert ops.pread_into(h, got, 8192) == 5 and bytes(got[:5]) == b"hello"
            ops.close(h)
            with pytest.raises(FileNotFoundError):
                ops.unlink("x/f")
            ops.unlink("g")
            with pytest.raises(FileNotFoundError):
                ops.stat("g")
            assert stat.S_ISDIR(ops.stat("")) and stat.S_ISDIR(ops.stat("x"))   # "": the base
    finally:
        fs.unmount()


# ------------------------------------------------------------------ failures
def test_failing_worker_is_reported_as_failed(tmp_path, monkeypatch, capsys):
    # The documented test hook: worker 1 raises in its tenth op.
    monkeypatch.setenv(cli.FAIL_ENV, "1")
    rc, recs = _run(tmp_path, "--scheme", "segment", "--workers", "2")
    table = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: worker 1: InjectedFailure" in table
    [r] = recs
    assert r["failed"].startswith("worker 1: InjectedFailure")
    assert "ops_per_sec" not in r and "ops" not in r
    assert r["worker_ops"][1] == 9                       # it failed in its tenth op
    assert not any(p.name.startswith("fxmark-") for p in tmp_path.iterdir())   # cleaned up


def test_wrong_contents_fail_the_run(tmp_path, monkeypatch, capsys):
    # A check that finds the data wrong turns the run into a failure.
    wl = dataclasses.replace(workloads.DWOL, check=lambda *a: "page 0 is not what was written")
    monkeypatch.setitem(WORKLOADS, "DWOL", wl)
    rc, recs = _run(tmp_path, "--workload", "DWOL", "--scheme", "inode", "--workers", "1")
    assert rc == 1
    [r] = recs
    assert r["failed"] == "wrong contents after the run: page 0 is not what was written"
    assert "ops_per_sec" not in r


def test_short_run_is_a_failure():
    ws = [WorkerResult(0, 0, ops=100, elapsed=1.0), WorkerResult(1, 1, ops=10, elapsed=0.5)]
    rec = summarise(PoolResult(1.0, ws))
    assert "ran 0.500 s" in rec["failed"] and "ops_per_sec" not in rec


def test_summary_numbers():
    ws = [WorkerResult(0, 0, ops=100, elapsed=1.0, utime=0.5, stime=0.25),
          WorkerResult(1, 1, ops=300, elapsed=1.0, utime=1.0, stime=0.0)]
    cpu = {"user": 0.5, "sys": 0.25, "idle": 0.25, "iowait": 0.0, "steal": 0.0}
    rec = summarise(PoolResult(1.0, ws, cpu=cpu))
    assert rec["ops"] == 400 and rec["seconds"] == 1.0 and rec["ops_per_sec"] == 400.0
    assert rec["worker_cpu"] == {"user": 0.75, "sys": 0.125}
    assert rec["cpu"] == cpu


def test_cpu_breakdown_from_proc_stat_fields():
    before = dict(user=100, nice=0, system=50, idle=1000, iowait=0, irq=0, softirq=0, steal=0)
    after = dict(user=160, nice=20, system=70, idle=1080, iowait=10, irq=5, softirq=5, steal=0)
    assert cpu_breakdown(before, after) == {"user": 0.4, "sys": 0.15, "idle": 0.4,
                                            "iowait": 0.05, "steal": 0.0}
    assert cpu_breakdown(before, before) is None


def test_replenishing_time_is_not_measured():
    # Every 20th op spends 0.05 s "replenishing" and says so: the worker's
    # measured time excludes it (about 0.6 s in all) and its stop time moves
    # back by as much.
    def setup(wid):
        def op(seq):
            time.sleep(0.001)
            if seq % 20 == 0:
                t = time.monotonic()
                time.sleep(0.05)
                return time.monotonic() - t
            return None
        return op
    pool = run_workers(1, setup, 0.3)
    rec = summarise(pool)
    assert "failed" not in rec
    [w] = pool.workers
    assert w.paused >= 0.05 * (w.ops // 20) >= 0.25
    assert 0.28 <= w.elapsed < 0.3 + 0.1
    assert rec["worker_paused"] == [round(w.paused, 6)]


def test_settle_steps_run_once_every_worker_is_set_up(tmp_path):
    # Worker 1 takes longer to set up (as a worker stocking more files does);
    # worker 0's settle step, which reads what every worker made, comes only
    # after it: each settle step sees both workers' setup done, and the run
    # itself starts after the settle steps.
    def setup(wid):
        time.sleep(0.3 * wid)
        (tmp_path / f"set-{wid}").write_text("")

        def settle():
            seen = sorted(p.name for p in tmp_path.glob("set-*"))
            (tmp_path / f"saw-{wid}").write_text(" ".join(seen))

        def op(seq):
            if seq == 1:
                (tmp_path / f"ran-{wid}").write_text(
                    " ".join(sorted(p.name for p in tmp_path.glob("saw-*"))))
            time.sleep(0.001)
        return op, 0, settle
    rec = summarise(run_workers(2, setup, 0.2))
    assert "failed" not in rec, rec
    for wid in range(2):
        assert (tmp_path / f"saw-{wid}").read_text() == "set-0 set-1"
        assert (tmp_path / f"ran-{wid}").read_text() == "saw-0 saw-1"


def test_endless_replenishing_fails_the_run():
    def setup(wid):
        def op(seq):
            time.sleep(0.01)
            return 0.01                     # all of its time is "replenishing"
        return op
    rec = summarise(run_workers(1, setup, 0.1))
    assert "replenishing took" in rec["failed"] and "ops_per_sec" not in rec


def test_bad_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--scheme", "nope", "--out", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--workload", "DWXX", "--out", "x"])
    assert e.value.code == 2
    assert cli.main(["run", "--target", str(tmp_path / "missing"), "--out", "x"]) == 2
    assert "not 'engine', 'engine-apart', 'pnova', 'pnova-devfuse' or a " in \
        capsys.readouterr().err
    assert cli.main(["run", "--target", f"a={tmp_path}", "--target", f"a={tmp_path}",
                     "--out", "x"]) == 2
    assert cli.main(["report", str(tmp_path / "none")]) == 2


def test_progress_line():
    out = io.StringIO()
    p = Progress(2, 5.0, enabled=True, out=out)
    p.start("DWOM engine pnova 2w")
    p.tick()
    p.clear()
    text = out.getvalue()
    assert "[1/2] DWOM engine pnova 2w  preparing" in text and "0.0/5 s" in text
    quiet = io.StringIO()
    q = Progress(1, 5.0, enabled=False, out=quiet)
    q.start("x")
    q.tick()
    q.clear()
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------ report and plot
@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    """A results directory with real runs (engine, two schemes, 1 and 2 workers) and
    one failed run."""
    base = tmp_path_factory.mktemp("recorded")
    out = base / "out"
    rc = cli.main(["run", "--workload", "DWOM,DRBH", "--scheme", "inode,pnova",
                   "--workers", "1,2", "--duration", "0.2", "--out", str(out),
                   "--image-dir", str(base), "--no-progress"])
    assert rc == 0
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"workload": "MWCL", "target": "engine", "scheme": "pnova",
                            "workers": 2, "failed": "worker 1: OSError: No space"}) + "\n")
    return str(out)


def test_report(recorded, tmp_path, capsys):
    assert cli.main(["report", recorded]) == 0
    text = capsys.readouterr().out
    assert "## DWOM: pwrite 4 KiB" in text and "## DRBH" in text and "## MWCL" in text
    assert "| engine | inode |" in text and "| engine | pnova |" in text
    assert "x) |" in text                           # a speed-up at 2 workers
    assert "FAILED" in text and "- engine pnova 2 workers: worker 1: OSError: No space" in text
    dest = tmp_path / "r.md"
    assert cli.main(["report", recorded, "-o", str(dest)]) == 0
    assert dest.read_text() == text


def test_rounds_measure_each_point_again_and_report_medians(tmp_path, capsys):
    """--rounds N runs every worker count of a round back to back, N rounds,
    every second round in the opposite order (a drift of the machine's speed
    then favours no worker count); the printed medians and the report give
    each point's median ops/s and the median of the speed-ups measured within
    each round, with their range."""
    assert cli.main(["run", "--rounds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--rounds must be 1 or more" in capsys.readouterr().err
    rc, recs = _run(tmp_path, "--workload", "MWCL", "--scheme", "pnova", "--workers", "1,2",
                    "--rounds", "3")
    assert rc == 0
    printed = capsys.readouterr().out
    assert [(r["round"], r["workers"]) for r in recs] == \
        [(1, 1), (1, 2), (2, 2), (2, 1), (3, 1), (3, 2)]
    assert {r["rounds"] for r in recs} == {3} and len({r["batch"] for r in recs}) == 1
    ops = {n: [r["ops_per_sec"] for r in recs if r["workers"] == n] for n in (1, 2)}
    ratios = [b / a for a, b in zip(ops[1], ops[2])]
    up = f"{statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x in 3 rounds"
    # each round's speed-up is printed, the second's once its 1-worker point is in
    rows = printed.split("medians of")[0]
    for ratio in ratios:
        assert f"{ratio:.2f}x" in rows
    assert rows.rfind(f"{ratios[1]:.2f}x") > rows.find(f"{ops[1][1]:,.0f}")
    assert "medians of 3 rounds" in printed
    assert f"{statistics.median(ops[2]):>12,.0f}  {up}" in printed
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "2 points, 2 of them measured in rounds" in text
    assert f"({up}) |" in text
    # a later run of the same point, in one round, replaces all three
    rc, recs = _run(tmp_path, "--workload", "MWCL", "--scheme", "pnova", "--workers", "2")
    assert rc == 0 and "round" not in recs[-1]
    capsys.readouterr()
    last = results.latest(recs)
    assert last[("MWCL", "engine", "pnova", 2)] is recs[-1]
    assert last[("MWCL", "engine", "pnova", 1)]["rounds_ops"] == ops[1]


def test_a_round_runs_every_target_before_the_next_round(tmp_path):
    """With several targets, each round runs all of them (each with its worker
    counts back to back) before the next round starts, so that a round's
    targets are measured in the same minute of the machine."""
    rc, recs = _run(tmp_path, "--workload", "MWCL", "--scheme", "pnova", "--workers", "1,2",
                    "--target", "engine", "--target", "engine-apart", "--rounds", "2")
    assert rc == 0
    assert [(r["round"], r["target"], r["workers"]) for r in recs] == \
        [(1, "engine", 1), (1, "engine", 2), (1, "engine-apart", 1), (1, "engine-apart", 2),
         (2, "engine", 2), (2, "engine", 1), (2, "engine-apart", 2), (2, "engine-apart", 1)]
    for r in recs:
        _sane(r, "MWCL", r["target"], "pnova")


def test_a_point_measured_in_rounds_is_their_median_and_fails_with_any_of_them():
    def rec(n, r, ops=None, batch="b1", failed=None):
        out = {"workload": "MWRM", "target": "engine", "scheme": "pnova", "workers": n,
               "round": r, "rounds": 3, "batch": batch}
        out.update({"failed": failed} if failed else {"ops_per_sec": ops})
        return out
    one = [rec(1, 1, 10.0), rec(1, 2, 30.0), rec(1, 3, 20.0)]
    two = [rec(2, 1, 15.0), rec(2, 2, 45.0), rec(2, 3, 60.0)]
    last = results.latest(one + two)
    a, b = last[("MWRM", "engine", "pnova", 1)], last[("MWRM", "engine", "pnova", 2)]
    assert a["ops_per_sec"] == 20.0 and b["ops_per_sec"] == 45.0
    # each round's 2-worker point over the same round's 1-worker point
    assert results.round_ratios(b, a) == [1.5, 1.5, 3.0]
    assert results.speedup(b, a) == "1.50x, 1.50-3.00x in 3 rounds"
    last = results.latest(one + two[:2] + [rec(2, 3, failed="worker 1: EIO")])
    assert last[("MWRM", "engine", "pnova", 2)]["failed"] == "worker 1: EIO"
    # a later batch replaces an earlier one whole
    later = [rec(1, 1, 7.0, "b2"), rec(1, 2, 9.0, "b2")]
    assert results.latest(one + later)[("MWRM", "engine", "pnova", 1)]["rounds_ops"] == [7.0, 9.0]


def test_plot(recorded, tmp_path, capsys):
    base = tmp_path / "fig"
    assert cli.main(["plot", recorded, "-o", str(base), "--title", "engine"]) == 0
    assert capsys.readouterr().out.split() == [f"{base}.png", f"{base}.svg"]
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "fig.svg").read_text()
    for text in ("DWOM", "DRBH", "engine/inode", "engine/pnova", "workers"):
        assert text in svg
    assert "MWCL" not in svg                        # only failed runs: no panel


def test_plot_with_nothing_to_draw(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(json.dumps(
        {"workload": "DWOM", "target": "engine", "scheme": "pnova", "workers": 1,
         "failed": "x"}) + "\n")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no successful run" in capsys.readouterr().err


# ------------------------------------------------------------------ reproduction
@pytest.mark.mount
def test_reproduce_refreshes_the_marked_section(tmp_path, fast_dir, capsys):
    from fxmark.reproduce import BEGIN, END
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# perf\n\nintro stays\n\n{BEGIN}\nold tables\n{END}\n\n## after\nstays too\n")
    os.makedirs(fast_dir, exist_ok=True)
    fig = tmp_path / "figs" / "cmp"
    rc = cli.main(["reproduce", "--workers", "1,2", "--duration", "0.2", "--schemes",
                   "inode,pnova", "--workloads", "DWOM", "--tmpfs", fast_dir,
                   "--out", str(tmp_path / "out"), "--doc", str(doc), "--figure", str(fig),
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    text = doc.read_text()
    assert text.startswith("# perf\n\nintro stays\n\n" + BEGIN)
    assert text.endswith(f"{END}\n\n## after\nstays too\n")
    assert "old tables" not in text
    body = text[text.index(BEGIN):text.index(END)]
    assert "Machine: " in body and "CPUs" in body and "Python " in body
    assert "fxmark reproduce --workers 1,2 --duration 0.2 --schemes inode,pnova" in body
    assert "![ops/s against workers, one panel per workload](figs/cmp.svg)" in body
    for row in ("| engine | inode |", "| engine | pnova |", "| pnova | inode |",
                "| pnova | pnova |", "| tmpfs | - |"):
        assert row in body
    assert "FAILED" not in body
    assert (tmp_path / "figs" / "cmp.png").exists() and (tmp_path / "figs" / "cmp.svg").exists()
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().split("\n")
            if x]
    assert len(recs) == 10                          # (2 schemes x 2 targets + tmpfs) x 2
    # A second reproduction replaces the section instead of adding one.
    rc = cli.main(["reproduce", "--workers", "1", "--duration", "0.2", "--schemes", "pnova",
                   "--workloads", "DWOL", "--tmpfs", fast_dir, "--out", str(tmp_path / "out"),
                   "--doc", str(doc), "--figure", str(fig), "--no-progress"])
    assert rc == 0
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "\n## DWOL" not in text and "\n### DWOL" in text
    assert "### DWOM" not in text                   # the old results were set aside


def test_plot_uses_a_log_axis_for_wide_ranges(tmp_path, capsys):
    recs = [{"workload": "DWOM", "target": t, "scheme": "-", "workers": n,
             "ops_per_sec": v * n} for t, v in (("slow", 1e3), ("fast", 1e6)) for n in (1, 2)]
    recs.append({"workload": "DWOL", "target": "slow", "scheme": "-", "workers": 1,
                 "ops_per_sec": 5e3})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli.main(["plot", str(tmp_path)]) == 0
    svg = (tmp_path / "fxmark.svg").read_text()
    assert svg.count("ops/s (log scale)") == 1          # DWOM only: DWOL spans nothing


def test_protected_and_unprotected_images_in_one_run(tmp_path, capsys):
    """--protection runs each scheme on images formatted with each protection
    (data checksums and parity, inode replicas); the unprotected runs are
    labelled SCHEME:none."""
    from pnova.engine import read_superblock
    from pnova.pmem import PMem
    rc, recs = _run(tmp_path, "--target", "engine", "--workload", "DWOM", "--scheme", "pnova",
                    "--workers", "1", "--protection", "full,data,csum,none", "--keep")
    assert rc == 0
    assert [r["scheme"] for r in recs] == ["pnova", "pnova:data", "pnova:csum", "pnova:none"]
    for r, want in zip(recs, (15, 3, 1, 0)):
        _sane(r, "DWOM", "engine", r["scheme"])
        pm = PMem(r["image"], readonly=True)
        try:
            assert read_superblock(pm)[0].features == want
        finally:
            pm.close()
            os.unlink(r["image"])          # a GiB each, allocated: not left behind
    with pytest.raises(SystemExit):
        cli.main(["run", "--protection", "some", "--out", "x"])


def test_images_have_room_for_the_files_a_workload_makes(tmp_path):
    """The image of a run holds every file the workload may make: sixteen workers
    unlinking from pools of 4,096 files each need more inodes than mkfs's default
    for 1 GiB (one per 16 KiB), and creates go on for the whole run."""
    from fxmark.targets import device_size_for, inodes_per_cpu_for
    from pnova.layout import BLOCK
    from pnova.mkfs import default_inodes_per_cpu
    ncpus = 16
    for wl in WORKLOADS.values():
        for n in (1, 2, 16):
            size = device_size_for(wl, n, 1.0)
            per = inodes_per_cpu_for(wl, n, 1.0, size, ncpus) \
                or default_inodes_per_cpu(size // BLOCK, ncpus)
            assert per * ncpus >= wl.files(n, 1.0), (wl.name, n)
            assert size >= wl.files(n, 1.0) * BLOCK, (wl.name, n)
    mwul = WORKLOADS["MWUL"]
    size = device_size_for(mwul, 16, 1.0)
    per = inodes_per_cpu_for(mwul, 16, 1.0, size, ncpus)
    assert per is not None                  # the default would have run out
    path = str(tmp_path / "room.img")
    format_device(path, size, numa_nodes=1, cpus_per_node=ncpus, inodes_per_cpu=per)
    fs = FileSystem.mount(path)
    try:
        assert fs.statfs().files >= 16 * (workloads.POOL + 1)
    finally:
        fs.unmount()
        os.unlink(path)                    # some GiB, allocated: not left behind


def test_image_sizing_counts_the_directory_logs_of_moved_files(tmp_path):
    """Two workers moving files from their own directories into a shared one
    (MWRM's pattern) use, beyond each file's log page and twin, blocks for the
    names in the directories' logs: the image sizing's allowance per file covers
    what they took (without it an 8 s MWRM run of two workers ran out of
    blocks at its first refill)."""
    from fxmark.targets import DENTRY_ROOM
    from pnova.layout import BLOCK
    from tests.helpers import fork_workers
    path = str(tmp_path / "names.img")
    format_device(path, 512 << 20)
    fs = FileSystem.mount(path)
    per_worker = 4000
    try:
        dirs = [fs.mkdir(1, b"%d" % w, 0o755, 0, 0).ino for w in range(2)]
        fs.prepare_workers(2)
        before = fs.statfs().bfree

        def work(cpu: int) -> None:
            fs.become_worker(cpu)
            names = [b"u-%d-%d" % (cpu, k) for k in range(per_worker)]
            for name in names:
                fs.create(dirs[cpu], name, 0o644, 0, 0)
            for name in names:
                fs.rename(dirs[cpu], name, 1, name)
        fork_workers(fs, 2, work)
        files = 2 * per_worker
        assert len(fs.readdir(1)) == files + 4          # '.', '..', 0 and 1 besides
        used = (before - fs.statfs().bfree) * BLOCK
        names_used = used - files * 2 * BLOCK           # beyond log pages and twins
        assert 0 < names_used <= files * DENTRY_ROOM, (used, files)
    finally:
        fs.unmount()
        os.unlink(path)                    # half a GiB, allocated: not left behind


def test_a_stock_follows_the_fastest_pool(monkeypatch, tmp_path):
    """A first pool made slowly (a cold image, the other workers stocking at
    the same time) does not leave the worker short: the fastest pool so far
    sets the rate, and the device's sizing still bounds the stock."""
    monkeypatch.setattr(workloads, "POOL", 8)
    monkeypatch.setattr(workloads, "CREATES_PER_SEC", 400)    # at most 3000 per worker
    times = iter([8 / 5, 8 / 100] + [8 / 100] * 200)           # 5 files/s, then 100/s

    def untimed(fn):
        fn()
        return next(times)
    monkeypatch.setattr(workloads, "_untimed", untimed)
    w = WORKLOADS["MWUL"]
    fops = PosixOps(str(tmp_path))
    shared = w.prepare(fops, 1)
    # 100/s * 3.0 margin * (2 s + 0.5): 750, in whole pools of 8
    assert workloads.STOCK_MARGIN == 3.0
    assert w.stock(fops, shared, 0, 2.0) == 752
    assert len(os.listdir(tmp_path / "0")) == 752
    monkeypatch.setattr(workloads, "_untimed", lambda fn: (fn(), 8 / 10_000)[1])
    (tmp_path / "b").mkdir()
    fops = PosixOps(str(tmp_path / "b"))
    shared = w.prepare(fops, 2)
    assert w.stock(fops, shared, 1, 2.0) == 3000                # the device's bound


@pytest.mark.parametrize("name", ["MWUL", "MWUM", "MWRM"])
def test_pool_workloads_stock_the_run_before_it_starts(monkeypatch, tmp_path, name):
    """Files to unlink or move are created before the clock starts, each worker
    its own, as many as the run should use (a refill during the run would be
    timed beside the other workers' ops); a refill still covers a run that
    goes beyond them, and the check counts the stocked files as well."""
    monkeypatch.setattr(workloads, "POOL", 8)
    monkeypatch.setattr(workloads, "CREATES_PER_SEC", 40)     # at most 304 per worker
    w = WORKLOADS[name]
    fops = PosixOps(str(tmp_path))
    shared = w.prepare(fops, 2)
    assert not [n for _, _, names in os.walk(tmp_path) for n in names]   # no file yet
    assert [w.stock(fops, shared, wid, 2.0) for wid in range(2)] == [304, 304]
    assert shared["stocked"] == [304, 304]
    made = sum(len([n for n in os.listdir(tmp_path / d) if n.startswith("u-")])
               for d in ("", "0", "1") if (tmp_path / d).is_dir())
    assert made == 608
    ops = [50, 310]                                  # the second one refills once
    refills = []
    for wid, n in enumerate(ops):
        op = w.worker(fops, shared, wid)
        refills.append(sum(1 for seq in range(1, n + 1) if op(seq) is not None))
    assert refills == [0, 1]
    assert w.check(fops, shared, 2, ops) is None
    # a stocked file that the run did not use, lost: the check says so
    victim = {"MWUL": "0/u-100", "MWUM": "u-0-100", "MWRM": "0/u-0-100"}[name]
    os.unlink(tmp_path / victim)
    assert w.check(fops, shared, 2, ops) is not None
