"""`python -m fuzz`: list, run, replay and seed the fuzz targets (see docs/fuzzing.md).

    python -m fuzz list
    python -m fuzz run [--seconds N] [--work-dir DIR] [--seed S] [TARGET...] [-- LIBFUZZER_ARGS]
    python -m fuzz replay TARGET [PATH...]
    python -m fuzz seed [TARGET...]

`run` exits 1 if any target crashed, hung or ran out of memory, 2 if atheris is
missing; `replay` exits 1 if any input fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fuzz import runner


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:  # the subprocess `run` starts: worker TARGET -- ARGS
        target, libfuzzer_args = argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:]
        runner.worker(target, libfuzzer_args)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the targets, one a line")
    run = sub.add_parser("run", help="fuzz targets for a bounded time each")
    run.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    run.add_argument("--work-dir", type=Path, default=runner.DEFAULT_WORK_DIR,
                     help="grown corpus and crashing inputs (default .fuzz/)")
    run.add_argument("--seed", type=int, default=None, help="libFuzzer's random seed")
    run.add_argument("targets", nargs="*", help="default: all")
    replay = sub.add_parser("replay", help="run inputs through a target, no atheris needed")
    replay.add_argument("target")
    replay.add_argument("paths", nargs="*", type=Path,
                        help="default: the target's committed corpus and regressions")
    seed = sub.add_parser("seed", help="regenerate fuzz/corpus/<target>/ from seeds()")
    seed.add_argument("targets", nargs="*", help="default: all")
    args = parser.parse_args(argv)

    if args.command == "list":
        print("\n".join(runner.targets()))
        return 0
    if args.command == "run":
        names = runner.check_names(args.targets)
        missing = runner.atheris_missing()
        if missing:
            print(f"fuzz: {missing}", file=sys.stderr)
            return 2
        outcomes = runner.run(names, args.seconds, args.work_dir, extra, args.seed)
        failed = [o.target for o in outcomes if not o.ok]
        if failed:
            print(f"fuzz: {len(failed)} of {len(outcomes)} targets failed: {', '.join(failed)}")
            return 1
        return 0
    if args.command == "replay":
        (target,) = runner.check_names([args.target])
        return 1 if runner.replay(target, args.paths) else 0
    for target in runner.check_names(args.targets):
        written = runner.write_seeds(target)
        print(f"{target}: {len(written)} seeds in {runner.CORPUS_DIR / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
