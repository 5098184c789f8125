"""Crash injection: every crash state at every fence recovers to an atomic, fsck-clean state."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from pnova import crashtest as ct
from pnova.fsck import Checker
from pnova.pmem import TrackedPMem

CRASHTEST = os.path.join(os.path.dirname(sys.executable), "pnova-crashtest")


def test_seq1_every_state_recovers():
    """All of seq1 at k=2: every operation type, singly, on a small tree."""
    results = ct.run("seq1", k=2, seed=0)
    failures = [f for r in results for f in r.failures]
    assert not failures, failures[:3]
    assert len(results) == len(ct.SEQ1_OPS)
    assert sum(r.checked for r in results) > 500


def test_crash_points_cover_every_fence():
    """A journaled operation is interrupted at each of its fences and at its end."""
    step = [("rename", "/A/foo", "/B/foo", 0)]
    assert not ct.run_steps(ct.SETUP, step, k=1).failures
    # two log appends' flushes share the journal's fences: F1..F4, then the end
    for point in range(5):
        assert ct.run_steps(ct.SETUP, step, k=1, only=(point, 0)).checked == 1
    assert ct.run_steps(ct.SETUP, step, k=1, only=(5, 0)).checked == 0


def _no_fence_commit(pm, tail_addr, new_tail):
    """A broken tail commit: the tail may reach the medium before the entries."""
    pm.store_u64(tail_addr, new_tail)
    pm.flush(tail_addr, 8)
    pm.fence()


def _no_fence_commit_twice(pm, tail_addr, replica_addr, new_tail):
    """The same, for a slot word and its replica (SPEC 5.5)."""
    for a in (tail_addr, replica_addr):
        pm.store_u64(a, new_tail)
        pm.flush(a, 8)
    pm.fence()


def test_harness_catches_a_missing_fence(monkeypatch, tmp_path):
    monkeypatch.setattr(TrackedPMem, "commit_u64", _no_fence_commit)
    monkeypatch.setattr(TrackedPMem, "commit_u64_twice", _no_fence_commit_twice)
    r = ct.run_case("seq1", 0, ct.SEQ1_OPS.index(("write", "/A/foo", 0, 4096, 0x71)), k=2)
    assert r.failures, "a commit without its fence must produce a bad crash state"
    bad = r.failures[0]
    wl, seed, case, point, state = ct.parse_id(bad.id)
    keep = str(tmp_path / "crash.img")
    again = ct.run_case(wl, seed, case, 2, only=(point, state), keep=keep)
    assert [f.reason for f in again.failures] == [bad.reason]      # replay is exact
    out = io.StringIO()
    assert Checker(keep, force=True, out=out).run() == 4
    assert "problem" in out.getvalue(), "fsck names the damage in the kept image"


def _candidates(model: ct.Model) -> list[ct.Step]:
    """Every step the random generator could propose, filtered to legal ones."""
    paths = [p for p in model.dump() if p != "/"]
    dirs = ["/"] + [p for p in paths if model.node(p).kind == "d"]
    out: list[ct.Step] = []
    for d in dirs:
        base = d.rstrip("/")
        for n in ("n1", "n2"):
            out += [("create", f"{base}/{n}", 0o644), ("mkdir", f"{base}/{n}", 0o755),
                    ("symlink", "t", f"{base}/{n}")]
    for p in paths:
        out += [("write", p, 5000, 300, 7), ("write", p, 0, 4096, 9), ("truncate", p, 100),
                ("truncate", p, 9000), ("unlink", p), ("rmdir", p), ("chmod", p, 0o700),
                ("setxattr", p, b"user.h", b"hv"), ("removexattr", p, b"user.h")]
        for q in paths + [d.rstrip("/") + "/moved" for d in dirs]:
            out += [("rename", p, q, 0), ("rename", p, q, 2), ("link", p, q)]
    return [s for s in out if ct._valid(model, s)]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_sequences_recover(data):
    model = ct.Model()
    for s in ct.SETUP:
        model.apply(s)
    ops = []
    for _ in range(3):
        step = data.draw(st.sampled_from(_candidates(model)))
        model.apply(step)
        ops.append(step)
    r = ct.run_steps(ct.SETUP, ops, k=1, ident="hypothesis")
    assert not r.failures, (ops, r.failures[:2])


def test_command_line_replay_and_summary(tmp_path):
    r = subprocess.run([CRASHTEST, "--workload", "seq1", "--max-k", "1", "--jobs", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("crash states: ") and last.endswith(" checked, 0 failed")
    keep = str(tmp_path / "state.img")
    r = subprocess.run([CRASHTEST, "--replay", "seq1:14:0:1", "--keep", keep],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "crash states: 1 checked, 0 failed" in r.stdout
    assert os.path.getsize(keep) == ct.IMAGE_SIZE
    r = subprocess.run([CRASHTEST, "--replay", "nonsense"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "bad crash state ID" in r.stderr


@pytest.mark.parametrize("workload", ["seq2", "random"])
def test_other_workloads_are_defined(workload):
    cases = ct.cases_for(workload, 7)
    assert cases and all(ops for _, ops in cases)


def test_fsck_repairs_a_recovery_that_skipped_the_rollback(monkeypatch, request):
    """A crash inside a rename's journal, recovered by a mount that skips the undo.

    One crash state of moving /A/foo to /B/foo has only /B's new tail on the
    medium: without the rollback both names exist and the link count is off.
    fsck -n must name it, -y repair it (keeping the data), and a second run
    must be clean.
    """
    from pnova.engine import FileSystem
    from pnova.journal import Journal

    step = [("rename", "/A/foo", "/B/foo", 0)]
    # In memory, as persistent memory is: recovery of an image on a disk would
    # itself make the names and link count consistent (DESIGN 24.3).
    shm = tempfile.mkdtemp(dir="/dev/shm")
    img = os.path.join(shm, "state.img")
    request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
    found = False
    with monkeypatch.context() as m:
        m.setattr(Journal, "rollback", lambda self: 0)       # recovery skips the undo
        for sno in range(64):
            if ct.run_steps(ct.SETUP, step, k=1, only=(2, sno), keep=img).checked == 0:
                break
            fs = FileSystem.mount(img)
            both = all(n in [e[0] for e in fs.readdir(fs.lookup(1, d).ino)]
                       for d, n in ((b"A", b"foo"), (b"B", b"foo")))
            fs.unmount()                                      # leaves the image clean
            if both:
                found = True
                break
    assert found, "no crash state with both names: the rename's journal changed shape"
    out = io.StringIO()
    assert Checker(img, force=True, out=out).run() == 4
    assert "link count" in out.getvalue()
    out = io.StringIO()
    assert Checker(img, policy="yes", force=True, out=out).run() == 1
    out2 = io.StringIO()
    assert Checker(img, force=True, out=out2).run() == 0, out2.getvalue()
    fs = FileSystem.mount(img)
    a = fs.lookup(fs.lookup(1, b"A").ino, b"foo")
    assert a.nlink == 2 and fs.read(a.ino, 0, 6000) == b"a" * 6000
    fs.unmount()


def test_two_writers_interleaved_every_state_recovers():
    """Two CPUs write one file in turn (global log and a local log): every crash
    state at every fence recovers to the state before or after the step."""
    results = ct.run("dual", k=2, seed=0)
    failures = [f for r in results for f in r.failures]
    assert not failures, failures[:3]
    assert sum(r.checked for r in results) > 200


# ---------------------------------------------------------------- page model
from pnova import crashpages as cp  # noqa: E402

def _page_model_all(workload: str) -> tuple[int, list]:
    """(states checked, failures) of every case of a page-model workload."""
    checked, failures = 0, []
    for i in range(len(cp.cases_for(workload))):
        r = cp.run_case(workload, i)
        checked += r.checked
        failures += r.failures
    return checked, failures


def test_page_model_seq1_every_state_recovers():
    """Every single operation, unsynced and then synced and followed by another:
    whatever subset of the dirty pages reached the disk, recovery gives a tree
    whose every path is as some state since the last sync had it, fsck-clean
    and usable (renames between directories and exchanges included)."""
    checked, failures = _page_model_all("seq1")
    assert checked > 1500
    assert not failures, failures[:3]


def test_page_model_edge_every_state_recovers():
    """Every operation with the logs it writes filled to their page's end, so
    that its entries open new pages or straddle two: recovery cuts logs
    between operations at page boundaries too.  (Before log walks said where
    the first entry of a page starts, a cut just past such an operation
    stored a tail inside the page before and the image was refused: 1,232 of
    these states failed; tests/test_durability.py keeps one of them.)"""
    checked, failures = _page_model_all("edge")
    assert checked > 4000
    assert not failures, failures[:3]


def test_edge_workload_fills_logs_to_their_page_end():
    """The edge workload's set-up leaves each log it fills with room for at
    most one 64-byte entry in its page (room 128) or none (room 64)."""
    import tempfile

    from pnova import layout as L
    from pnova.engine import FileSystem

    for setup, ops in ct.edge_cases()[::len(ct.SEQ1_OPS)]:
        room = setup[-1][2]
        with tempfile.TemporaryDirectory() as tmp:
            img = os.path.join(tmp, "e.img")
            ct.prepare_image(img, setup)
            fs = FileSystem.mount(img, readonly=True)
            drv = ct.Driver(fs)
            for path in ct.FILLED:
                left = L.LOG_DATA - fs.get(drv.ino(path)).tail % L.BLOCK
                assert room - 64 <= left < room, (path, left)
            fs.unmount()


def test_page_model_bites_when_freed_blocks_are_reused_before_a_sync():
    """The page model catches a real ordering bug: without holding freed blocks
    until the next sync, a block freed by an overwrite is rewritten by a later
    operation while the disk may still hold the entry that uses it."""
    ops = [("write", "/A/foo", 0, 4096, 0x71), ("create", "/A/new", 0o644),
           ("write", "/A/new", 0, 8192, 0x33)]
    held = cp.run_steps(cp.SETUP, ops)
    assert held.checked > 100 and not held.failures, held.failures[:3]
    reused = cp.run_steps(cp.SETUP, ops, hold_frees=False)
    assert reused.failures
    # the synced write's block, rewritten for the new file: recovery finds it
    # used twice (the sync record vouches for the synced write's data)
    assert any("is used twice" in f.reason or "matches no allowed state" in f.reason
               for f in reused.failures)


def test_page_model_a_write_partly_replaced_since_the_last_sync(monkeypatch):
    """A three-page write whose last page is partial, then a write over its first
    two pages, no sync between: every page of the first write's data, and its
    checksum copies and parity, may or may not have arrived.  The first write
    still maps its last page, so recovery checks its data (all three pages:
    their blocks are held until the sync record covers it) and cuts it when
    some did not arrive.  Without the record, recovery checks only writes that
    map all their pages, and the page's stale protection records stay."""
    from pnova.rebuild import Rebuild
    ops = [("write", "/A/foo", 4096, 8197, 0x76), ("write", "/A/foo", 5000, 5000, 0x73)]
    res = cp.run_steps(cp.SETUP, ops)
    assert res.checked > 100 and not res.failures, res.failures[:3]
    monkeypatch.setattr(Rebuild, "_sync_covered", lambda self: None)
    assert cp.run_steps(cp.SETUP, ops).failures


def test_page_model_bites_when_a_split_write_gives_its_blocks_back_early(monkeypatch):
    """A block a three-page write no longer maps, while it maps its other pages,
    must wait for the sync record to cover that write: reused at once (no sync
    saw it), a sync then makes the write durable while the record on the disk
    still says recovery must check its data, which no longer matches."""
    from pnova.inode import Inode
    ops = [("write", "/A/foo", 0, 3 * 4096, 0x41), ("write", "/A/foo", 0, 4096, 0x42),
           ("create", "/A/new", 0o644), ("write", "/A/new", 0, 4096, 0x43), cp.SYNC,
           cp.AFTER_SYNC]
    res = cp.run_steps(cp.SETUP, ops)
    assert res.checked > 50 and not res.failures, res.failures[:3]
    monkeypatch.setattr(Inode, "holds", lambda self, block: False)
    assert cp.run_steps(cp.SETUP, ops).failures


def test_page_model_a_log_compacted_on_a_disk(monkeypatch, tmp_path):
    """A file written and given xattrs after a sync, its log compacted on a disk
    image (the new chain pushed to the disk by an msync that promises nothing,
    then, after the next operation, the entries written meanwhile copied into it
    and the slot switched through the journal), then new files written into
    freed blocks: every crash state the page model makes recovers to an allowed
    state.  (The crash workloads do not otherwise reach a compaction on a disk,
    whose threshold is 256 log pages.)  Two ways it bites (DESIGN 24.5): with
    no push, the slot may reach the disk naming a new chain that did not (the
    synced value of the xattr is lost); with a push of the log pages alone, the
    chain maps the unsynced write's block, whose data may not have arrived
    (the write survives torn).  And a third: with the blocks the chain maps
    left fresh, the second write's replaced block goes straight back and is
    reused by /A/new, while a slot on the disk may name the chain that maps it
    (recovery finds the block used twice)."""
    import pnova.gc
    from pnova import layout as L
    from pnova.alloc import Allocator
    from pnova.engine import FileSystem
    from pnova.pmem import PAGE, PagedPMem
    monkeypatch.setattr(pnova.gc, "DISK_COMPACT_MIN_PAGES", 4)
    value = [bytes([0x41 + i]) * 1800 for i in range(7)]  # two entries fill a log page
    ops = [("setxattr", "/bar", b"user.big", v) for v in value[:4]] + [cp.SYNC] + \
        [("write", "/bar", 0, 4096, 0x55)] + \
        [("setxattr", "/bar", b"user.big", v) for v in value[4:]] + \
        [("write", "/bar", 0, 4096, 0x66)] + \
        [("create", "/A/new", 0o644), ("write", "/A/new", 0, 8192, 0x33)]
    img = str(tmp_path / "d.img")                # the same steps on the engine alone:
    ct.prepare_image(img, ct.SETUP)              # the log is compacted once, after the sync
    fs = FileSystem.mount(img, device=PagedPMem(img))
    fs.hold_frees_until_sync()
    drv = ct.Driver(fs)
    bar = drv.ino("/bar")
    counts = []
    for op in ops:
        fs.sync() if op == cp.SYNC else drv.apply(op)
        counts.append(fs._rewrites(bar))
    fs.unmount()
    assert counts[5] == counts[0] and counts[-1] == counts[0] + 2
    res = cp.run_steps(cp.SETUP, ops)
    assert res.checked > 300 and not res.failures, res.failures[:3]

    def logs_only(self: PagedPMem) -> None:
        # the pages that end in a valid log page tail, and no data block
        for page in self.dirty_pages().tolist():
            lo = page * PAGE
            if L.check_page_tail(self.buf[lo + L.PT_NEXT:lo + PAGE].tobytes()) is None:
                self.disk[lo:lo + PAGE] = self.buf[lo:lo + PAGE]
        if self.on_push is not None:
            self.on_push(self)

    monkeypatch.setattr(Allocator, "unfresh", lambda self, start, n: None)
    assert cp.run_steps(cp.SETUP, ops).failures
    monkeypatch.undo()
    monkeypatch.setattr(pnova.gc, "DISK_COMPACT_MIN_PAGES", 4)
    monkeypatch.setattr(PagedPMem, "push", logs_only)
    assert cp.run_steps(cp.SETUP, ops).failures
    monkeypatch.setattr(PagedPMem, "push", lambda self: None)
    assert cp.run_steps(cp.SETUP, ops).failures


def test_page_model_command_line(tmp_path):
    keep = tmp_path / "crash.img"
    out = subprocess.run([sys.executable, "-m", "pnova.crashtest", "--replay",
                          "pages:seq1:2:0:1", "--keep", str(keep)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "crash states: 1 checked, 0 failed" in out.stdout
    assert keep.stat().st_size == cp.IMAGE_SIZE
    bad = subprocess.run([sys.executable, "-m", "pnova.crashtest", "--model", "pages",
                          "--workload", "dual"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "seq1, seq2 and edge" in bad.stderr


def test_page_model_renames_need_their_marks(monkeypatch):
    """A rename between two directories changes two logs; when only one of their
    pages arrives, recovery settles it from the marks the two dentries carry.
    Without that step the page model finds the file under both names, or the
    exchange half done."""
    from pnova.rebuild import Rebuild

    cases = cp.cases_for("seq1")
    renames = [i for i, (_, ops) in enumerate(cases)
               if ops[0][0] == "rename" and ops[0][1].rsplit("/", 1)[0]
               != ops[0][2].rsplit("/", 1)[0]]
    assert len(renames) >= 4
    monkeypatch.setattr(Rebuild, "_finish_renames", lambda self: 0)
    failed = [f for i in renames for f in cp.run_case("seq1", i).failures]
    assert failed
    assert any("matches no allowed state" in f.reason for f in failed)


def test_page_model_inode_slots_wait_for_a_sync(monkeypatch):
    """An inode slot freed since the last sync is not given to a new inode before
    the next one: the disk may still hold the name of the old inode, which would
    come back naming the new one.  Without holding slots back, the page model
    finds /A/foo naming the new, empty file."""
    from pnova.engine import FileSystem

    ops = [("unlink", "/A/foo"), ("create", "/A/new", 0o644)]
    held = cp.run_steps(cp.SETUP, ops)
    assert held.checked > 50 and not held.failures, held.failures[:3]
    hold = FileSystem.hold_frees_until_sync

    def hold_blocks_only(self):
        hold(self)
        self.hold_inos = False

    monkeypatch.setattr(FileSystem, "hold_frees_until_sync", hold_blocks_only)
    reused = cp.run_steps(cp.SETUP, ops)
    assert any("/A/foo" in f.reason for f in reused.failures), reused.failures[:3]


@pytest.mark.parametrize("ops", [
    [("rename", "/A/foo", "/bar", 0), ("unlink", "/bar")],
    [("link", "/A/foo", "/B/foolink"), ("rename", "/A/foo", "/bar", 0)],
    [("write", "/A/foo", 0, 4096, 0x71), ("unlink", "/A/foo")],
    [("rename", "/A/foo", "/bar", 2), ("rename", "/A/foo", "/A/foo2", 0)],
])
def test_page_model_undoes_what_depended_on_an_operation_that_did_not_arrive(ops, monkeypatch):
    """Two operations since the last sync, the second on what the first made: when
    the first is undone because a page of it did not arrive, the second must not
    survive alone.  An inode an unlink freed comes back with the name the unlink
    could not remove (its slot and blocks were held); a rename whose new name
    never arrived gives its old name back even to an inode with other names or
    none left; an exchange half is undone with what followed it in its
    directory.  Without bringing freed inodes back the first case fails; the
    third checks that an inode brought back keeps only the data that arrived."""
    from pnova.rebuild import Rebuild

    r = cp.run_steps(cp.SETUP, ops)
    assert r.checked > 20 and not r.failures, r.failures[:3]
    if ops[0][0] == "rename" and ops[-1][0] == "unlink":
        monkeypatch.setattr(Rebuild, "_resurrect", lambda self, ino: False)
        assert cp.run_steps(cp.SETUP, ops).failures


@pytest.mark.parametrize("ops", [
    [("link", "/A/foo", "/B/foolink"), ("rename", "/A/foo", "/B/foo", 0)],
    [("rename", "/A/foo", "/bar", 2), ("rename", "/A/foo", "/B/fresh", 1)],
])
def test_page_model_gives_back_the_old_name_of_a_twice_named_file_whose_new_name_did_not_arrive(
        ops, monkeypatch):
    """A file with a second name is moved into another directory under a name
    that held nothing, and only the removal of its old name reaches the disk.
    The inode still has a name and the new name holds nothing older, so only
    the removal's record of the new name's directory (format 5) shows that the
    new name never arrived there: nothing of the move, and nothing later, is in
    that directory's log.  Without that evidence the old name is lost."""
    from pnova.rebuild import Rebuild

    case = [o for _, o in cp.cases_for("seq2")].index(ops)   # its states, as the sweep's
    r = cp.run_case("seq2", case)
    assert r.checked > 50 and not r.failures, r.failures[:3]
    monkeypatch.setattr(Rebuild, "_new_half_missing", lambda self, *a: False)
    assert cp.run_case("seq2", case).failures


def _moved_removals(fs) -> list[tuple]:
    """(flags, peer hash, peer directory) of every D_MOVED removal in the logs."""
    from pnova import layout as L
    from pnova import log as plog

    out = []
    for d in [i for i in fs.cache.values() if i.is_dir]:
        for raw in plog.walk(fs.pm, d.head, d.tail, d.ino, fs.max_log_pages, None, 0, {}):
            m = L.dentry_moved(raw) if raw[0] == L.E_DENTRY else None
            if m and L.decode_entry(raw)[2] == L.D_REMOVE:
                out.append(m)
    return out


@pytest.mark.parametrize("version", [4, 5, 6])
def test_a_move_between_directories_names_the_new_directory_from_format_5(tmp_path, version):
    """Format 5 adds the new name's directory to the removal of a move between
    directories; a version-4 image keeps version 4's shorter marks (a writer
    preserves the version it found), images before version 6 get no sync
    record, and all read back and check clean."""
    from pnova import layout as L
    from pnova.engine import FileSystem
    from pnova.mkfs import format_device

    from helpers import set_version

    path = str(tmp_path / "v.img")
    # (inode replicas came with version 7)
    format_device(path, 16 << 20, features=L.FEATURE_DATA_CSUM | L.FEATURE_DATA_PARITY)
    if version < L.FORMAT_VERSION:
        set_version(path, version)
    fs = FileSystem.mount(path)
    assert fs.sb.version == version
    a, b = fs.mkdir(1, b"a", 0o755).ino, fs.mkdir(1, b"b", 0o755).ino
    fs.create(a, b"f", 0o644)
    fs.rename(a, b"f", b, b"g")
    ((flags, peer, peer_dir),) = _moved_removals(fs)
    assert peer == L.name_hash(b, b"g")
    assert peer_dir == (b if version >= 5 else 0)
    fs.hold_frees_until_sync()
    fs.sync()
    assert bool(fs.pm.read_u64(L.SYNC_RECORD)) == (version >= 6)
    fs.unmount()
    out = io.StringIO()
    assert Checker(path, force=True, out=out).run() == 0, out.getvalue()
    fs = FileSystem.mount(path)
    assert fs.sb.version == version and fs.lookup(b, b"g")
    fs.unmount()


def test_page_model_undoing_an_exchange_takes_what_used_its_names(monkeypatch):
    """An exchange of /A/foo and /bar, then a link of /A/foo (the inode the
    exchange moved there).  Two mechanisms keep the link from surviving without
    the exchange: the link syncs first, as any use of an inode a rename moved
    between directories since the last sync does (with neither half of the
    exchange on the disk nothing would show that the link depended on it), and
    undoing half an exchange cuts what later used the inodes it moved."""
    from pnova.namei import Namei
    from pnova.rebuild import Rebuild

    ops = [("rename", "/A/foo", "/bar", 2), ("link", "/A/foo", "/B/foolink")]
    r = cp.run_steps(cp.SETUP, ops)
    assert r.checked > 50 and not r.failures, r.failures[:3]
    monkeypatch.setattr(Namei, "_moved_unsynced", lambda self, inos: False)
    assert cp.run_steps(cp.SETUP, ops).failures        # the barrier bites
    # without it, a state where the exchange's half in /A and the link arrived
    # (state 56 of the link: the cut of what used the moved inode saves it)
    case = [o for _, o in cp.cases_for("seq2")].index(ops)
    r = cp.run_case("seq2", case, only=(1, 56))
    assert r.checked == 1 and not r.failures, r.failures
    monkeypatch.setattr(Rebuild, "_cut_dependents", lambda self, seq, moved: None)
    assert cp.run_case("seq2", case, only=(1, 56)).failures
