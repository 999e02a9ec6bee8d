"""Is the Explorer's browser test reliable under load? Run it many times beside CPU-burning processes.

Each round runs ``tests/explorer/test_browser.py`` (JupyterLab + headless Chromium, two quick widget
choices in a row) in a fresh pytest process while ``--burners`` processes keep every core busy. Prints
one line per round (pass/fail, seconds) and a summary; exits 1 if any round failed, with the failing
rounds' pytest output kept under ``--logs``. Not part of ``make test`` (20 rounds take about 30 min).

    python scripts/explorer_stress.py [--rounds 20] [--burners 2] [--logs figures/explorer_stress]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/explorer/test_browser.py::test_explorer_in_jupyterlab"


def burn() -> None:
    """Keep one core busy until terminated."""
    while True:
        pass


def run_round(logs: Path, index: int, timeout: float) -> tuple[bool, float]:
    """One pytest run of the browser test; its output is kept when it fails (or is skipped)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "-rs"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, ok = done.stdout + done.stderr, done.returncode == 0 and " passed" in done.stdout
    except subprocess.TimeoutExpired as err:
        output, ok = f"timed out after {timeout:.0f} s\n{err.stdout or ''}", False
    if not ok:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"round_{index:02d}.log").write_text(output)
    return ok, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning processes beside the test")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one round may take")
    parser.add_argument("--logs", type=Path, default=ROOT / "figures" / "explorer_stress")
    args = parser.parse_args()
    if args.rounds < 1 or args.burners < 0:
        parser.error("--rounds must be at least 1 and --burners at least 0")
    burners = [mp.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for proc in burners:
        proc.start()
    failed = []
    try:
        for index in range(1, args.rounds + 1):
            ok, seconds = run_round(args.logs, index, args.timeout)
            print(f"round {index:2d}/{args.rounds}: {'passed' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
            if not ok:
                failed.append(index)
    finally:
        for proc in burners:
            proc.terminate()
    print(f"{args.rounds - len(failed)} passed, {len(failed)} failed (beside {args.burners} CPU-burning processes)")
    if failed:
        print(f"logs of the failed rounds: {args.logs}")
        sys.exit(1)


if __name__ == "__main__":
    main()
