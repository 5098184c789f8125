"""fsck.pnova: check and repair a pnova image, with e2fsck's options and fsck(8) exit codes."""
from __future__ import annotations

import argparse
import os
import sys

from pnova.fsck import NO, PREEN, YES, CheckAborted, Checker
from pnova.layout import FORMAT_VERSION
from pnova.util import image_locked, lock_image

EXIT_OK, EXIT_FIXED, EXIT_LEFT, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16
PROG = "fsck.pnova"


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:      # usage errors exit 16, not argparse's 2
        raise _Usage(message)


def _parser() -> _Parser:
    ap = _Parser(prog=PROG, description="Check a pnova filesystem image (on-media format "
                 f"version {FORMAT_VERSION}) and repair it.",
                 epilog="Exit status (summed): 0 no errors, 1 errors corrected, 4 errors "
                 "left uncorrected, 8 operational error, 16 usage error.")
    ap.add_argument("device", help="the image file")
    ap.add_argument("-n", action="store_true", help="check only: open read-only, answer no")
    ap.add_argument("-y", action="store_true", help="repair everything, answer yes")
    ap.add_argument("-p", "-a", dest="p", action="store_true",
                    help="repair what is safe without asking (preen)")
    ap.add_argument("-f", action="store_true", help="check even if the image is clean")
    ap.add_argument("-v", action="store_true",
                    help="verbose: free space and fragmentation per CPU region")
    ap.add_argument("-C", action="store_true", help="show progress on stderr")
    return ap


def _progress_printer():
    last = [-1]

    def show(phase: str, fraction: float) -> None:
        pct = int(fraction * 100)
        if pct == last[0]:
            return
        last[0] = pct
        end = "\n" if pct >= 100 else ""
        print(f"\r{PROG}: checking {phase}: {pct:3d}%", end=end, file=sys.stderr, flush=True)
        if pct >= 100:
            last[0] = -1
    return show


def _interactive():
    """Ask on the terminal; 'a' answers yes to this and every later question."""
    all_yes = [False]

    def ask(question: str) -> bool:
        if all_yes[0]:
            print(f"  {question}? yes")
            return True
        while True:
            try:
                a = input(f"  {question}? [y/n/a] ").strip().lower()
            except EOFError:
                return False
            if a in ("y", "yes"):
                return True
            if a in ("n", "no"):
                return False
            if a in ("a", "all"):
                all_yes[0] = True
                return True
    return ask


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # e2fsck's -C takes a file descriptor ("-C 0"): accept and ignore it.
    for i, a in enumerate(argv[:-1]):
        if a == "-C" and argv[i + 1].isdigit():
            del argv[i + 1]
            break
    try:
        a = _parser().parse_args(argv)
        if a.n + a.y + a.p > 1:
            raise _Usage("only one of the options -n, -y and -p/-a may be given")
    except _Usage as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        print(f"usage: {PROG} [-n|-y|-p] [-f] [-v] [-C] IMAGE", file=sys.stderr)
        return EXIT_USAGE
    if a.y:
        policy = YES
    elif a.p:
        policy = PREEN
    elif a.n or not (sys.stdin.isatty() and sys.stdout.isatty()):
        policy = NO                       # nobody to ask: check only
    else:
        policy = _interactive()
    lock_fd = None
    if not os.path.exists(a.device):
        print(f"{PROG}: cannot open {a.device}: No such file or directory", file=sys.stderr)
        return EXIT_OPERATIONAL
    if policy != NO:
        try:
            lock_fd = lock_image(a.device)   # held while we repair: no mount meanwhile
        except BlockingIOError:
            print(f"{PROG}: {a.device} is mounted; unmount it first (or check it read-only "
                  "with -n)", file=sys.stderr)
            return EXIT_OPERATIONAL
        except OSError as e:
            print(f"{PROG}: cannot open {a.device}: {e.strerror}", file=sys.stderr)
            return EXIT_OPERATIONAL
    elif image_locked(a.device):
        print(f"{PROG}: warning: {a.device} is mounted; the check may see it change",
              file=sys.stderr)
    progress = _progress_printer() if a.C or sys.stderr.isatty() else None
    try:
        status = Checker(a.device, policy=policy, force=a.f, verbose=a.v,
                         progress=progress).run()
    except CheckAborted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    except OSError as e:
        print(f"{PROG}: {a.device}: {e.strerror or e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return status


if __name__ == "__main__":
    sys.exit(main())
