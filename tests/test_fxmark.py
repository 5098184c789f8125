"""The fxmark harness: DWOM against the engine with 1 and 2 worker processes.

Throughput numbers are only checked for sanity (positive, consistent with the
op count and elapsed time), never compared with each other: timings depend on
the machine.
"""
from __future__ import annotations

import json
import os
import struct

import pytest

from fxmark import cli
from fxmark.workers import PoolResult, WorkerResult, summarise
from pnova.engine import FileSystem
from pnova.locks import SCHEMES

DURATION = 0.5
STRIDE = 8 << 20
PAGE = 4096
KEYS = {"workload", "target", "scheme", "workers", "ops", "seconds", "ops_per_sec", "cpu"}


def _run(tmp_path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "out"
    rc = cli.main(["run", "--target", "engine", "--workload", "DWOM",
                   "--duration", str(DURATION), "--out", str(out),
                   "--image-dir", str(tmp_path), *args])
    path = out / "results.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return rc, recs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dwom_records_and_contents(tmp_path, scheme, capsys):
    rc, recs = _run(tmp_path, "--scheme", scheme, "--workers", "1,2", "--keep")
    table = capsys.readouterr().out
    assert rc == 0, table
    assert "FAILED" not in table
    assert [r["workers"] for r in recs] == [1, 2]         # one line per run
    for r in recs:
        assert KEYS <= r.keys() and "failed" not in r
        assert (r["workload"], r["target"], r["scheme"]) == ("DWOM", "engine", scheme)
        assert r["ops"] > 0 and r["ops"] == sum(r["worker_ops"])
        assert all(n > 0 for n in r["worker_ops"])
        assert 0.45 <= r["seconds"] <= 2.0
        assert r["ops_per_sec"] == pytest.approx(r["ops"] / r["seconds"])
        cpu = r["cpu"]
        assert set(cpu) == {"user", "sys", "idle"}
        assert all(v >= 0.0 for v in cpu.values())
        assert cpu["idle"] == pytest.approx(max(0.0, 1.0 - cpu["user"] - cpu["sys"]), abs=1e-3)
        _check_image(r["image"], r["workers"], r["worker_ops"])


def _check_image(image: str, n: int, worker_ops: list[int]) -> None:
    """Each worker's page holds the last pattern it wrote; the rest is the pre-fill."""
    fs = FileSystem.mount(image)
    try:
        ino = fs.lookup(1, b"dwom").ino
        assert fs.getattr(ino).size == (n + 1) * STRIDE
        for wid in range(n):
            page = fs.read(ino, wid * STRIDE, PAGE)
            assert struct.unpack_from("<QQ", page) == (wid, worker_ops[wid])
            assert page[16:] == bytes([0x41 + wid]) * (PAGE - 16)
            assert fs.read(ino, wid * STRIDE + PAGE, PAGE) == b"\x5a" * PAGE
        assert fs.read(ino, n * STRIDE, PAGE) == b"\x5a" * PAGE
    finally:
        fs.unmount()
    os.unlink(image)


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


def test_short_run_is_a_failure():
    ws = [WorkerResult(0, 0, ops=100, elapsed=1.0), WorkerResult(1, 1, ops=10, elapsed=0.5)]
    rec = summarise(PoolResult(1.0, ws))
    assert "ran 0.500 s" in rec["failed"] and "ops_per_sec" not in rec


def test_summary_numbers():
    ws = [WorkerResult(0, 0, ops=100, elapsed=1.0, utime=0.5, stime=0.25),
          WorkerResult(1, 1, ops=300, elapsed=1.0, utime=1.0, stime=0.0)]
    rec = summarise(PoolResult(1.0, ws))
    assert rec["ops"] == 400 and rec["seconds"] == 1.0 and rec["ops_per_sec"] == 400.0
    assert rec["cpu"] == {"user": 0.75, "sys": 0.125, "idle": 0.125}


def test_bad_usage():
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--scheme", "nope", "--out", "x"])
    assert e.value.code == 2
