#!/usr/bin/env python3
"""Where case b)'s time goes: CPU seconds of the source registry, the target registry and the copier
(from /proc/<pid>/stat and /usr/bin/time) for each of N copies of b)'s index to a fresh target.

usage: python3 bench/cpu.py [--rounds N] [-- extra mirror-mirror copy flags, e.g. --jobs 4]
Needs a release build (cargo build --release) and docker-registry, as bench/run.sh does."""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def main():
    args = sys.argv[1:]
    rounds = 5
    if args[:1] == ["--rounds"]:
        rounds, args = int(args[1]), args[2:]
    extra = args[1:] if args[:1] == ["--"] else args
    work = tempfile.mkdtemp(prefix="mm-cpu-")
    src = bench.Registry(os.path.join(work, "src"))
    try:
        img = bench.make_multi(src)
        for rnd in range(rounds):
            dst = bench.Registry(os.path.join(work, f"dst{rnd}"))
            try:
                s0, d0 = cpu(src.proc.pid), cpu(dst.proc.pid)
                t0 = time.time()
                r = subprocess.run(
                    ["/usr/bin/time", "-f", "%U %S", os.path.join(ROOT, "target/release/mirror-mirror"),
                     "copy", f"{src.host}/{img.repo}:{img.tag}", f"{dst.host}/m/x"] + extra,
                    capture_output=True, text=True, check=True)
                wall = time.time() - t0
                user, system = (float(x) for x in r.stderr.strip().splitlines()[-1].split())
                print(f"wall {wall:.2f} s  CPU s: source registry {cpu(src.proc.pid) - s0:.2f}, "
                      f"target registry {cpu(dst.proc.pid) - d0:.2f}, mirror-mirror {user + system:.2f}",
                      flush=True)
            finally:
                dst.close()
    finally:
        src.close()


if __name__ == "__main__":
    main()
