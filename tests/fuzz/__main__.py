"""Run a fuzz target under atheris (libFuzzer) and keep what it finds.

    python -m tests.fuzz TARGET [--seconds N]      (make fuzz runs every target)

The run starts from the saved corpus (``tests/fuzz/corpus/TARGET``) and the
seeds, and writes new inputs to a scratch folder; at the end libFuzzer's
merge copies into the saved corpus only those that reach code the corpus
did not (so it stays small), and a crashing input is saved there too, as
``crash-*``, where ``make test`` replays it until the bug is fixed.
Needs the ``fuzz`` extra (``pip install -e '.[fuzz]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def _write_seeds(target: str, folder: Path) -> None:
    from tests.fuzz.seeds import SEEDS

    for data in SEEDS[target]():
        (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def _fuzz(target: str, argv: list[str]) -> None:
    """In the child process: instrument our code, then hand over to libFuzzer."""
    import logging

    import atheris

    logging.disable(logging.WARNING)  # (recovery warns of every torn tail; the session target watches ERROR)
    with atheris.instrument_imports(include=["protocol", "broker", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS
    # libFuzzer's merge runs argv[0] again: the script main() wrote, which runs this.
    atheris.Setup([os.environ["TIDINGS_FUZZ_SELF"], *argv], TARGETS[target])
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("target", choices=["decoder", "session", "session-users", "recovery"])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default: %(default)s)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _fuzz(args.target, args.child)
        return 0
    saved = CORPUS / args.target
    saved.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"tidings-fuzz-{args.target}-") as tmp:
        found, seeds, artifacts = Path(tmp, "found"), Path(tmp, "seeds"), Path(tmp, "artifacts")
        for folder in (found, seeds, artifacts):
            folder.mkdir()
        _write_seeds(args.target, seeds)
        script = Path(tmp, "fuzz-target")
        root = Path(__file__).resolve().parents[2]
        script.write_text(
            f'#!/bin/sh\ncd "{root}" && exec "{sys.executable}" -m tests.fuzz {args.target} --child "$@"\n'
        )
        script.chmod(0o755)
        os.environ["TIDINGS_FUZZ_SELF"] = str(script)
        me = [str(script)]
        run = subprocess.run([*me, str(found), str(saved), str(seeds), f"-max_total_time={args.seconds}",
                              f"-artifact_prefix={artifacts}/", "-print_final_stats=1"], check=False)  # fmt: skip
        before = len(list(saved.iterdir()))
        subprocess.run([*me, "-merge=1", str(saved), str(found)], check=True, capture_output=True)
        for crash in artifacts.iterdir():
            shutil.copy(crash, saved / crash.name)
            print(f"saved {saved / crash.name}: replay with: python -m pytest tests/fuzz -k {crash.name}")
        print(f"{args.target}: {len(list(saved.iterdir())) - before} new inputs kept in {saved}")
        return run.returncode


if __name__ == "__main__":
    sys.exit(main())
