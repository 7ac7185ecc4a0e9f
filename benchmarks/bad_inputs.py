"""Bad inputs: every hostile or careless input of tests/test_bad_inputs.py through `kdray`, and what became of it.

    python benchmarks/bad_inputs.py [--markdown]

Each case of the test table is set up in a fresh temporary directory beside a small hand-made run
and run through the CLI's `main()` in this process; then three attempts to make a file on disk run
code. Counted from what happened, not from what the tests assert:

- refused by name: exit status 2 with one `kdray: error:` message (at most 3 lines) matching the
  thing the case names, and no traceback;
- data lost: files under the case's directory removed or changed by the refused command (target 0);
- code executed: marker files written by code a model file named (target 0).

`--markdown` prints the per-case table for benchmarks/bad_inputs.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import platform
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_bad_inputs import CASES, MarkerPickle, edit_json, make_run, student_spec, tree  # noqa: E402

from kdray.cli import main as kdray_main  # noqa: E402


def run_case(argv_of, pattern: str) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        run = make_run(root)
        argv = [str(arg) for arg in argv_of(root, run)]
        before = tree(root)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = kdray_main(argv)
        after = tree(root)
    message = err.getvalue().strip()
    lost = sum(1 for name, data in before.items() if after.get(name) != data)
    named = (code == 2 and message.startswith("kdray: error: ") and len(message.splitlines()) <= 3
             and re.search(pattern, message) is not None and "Traceback" not in message)
    return {"code": code, "named": named, "lost": lost, "message": " / ".join(line.strip() for line in message.splitlines())}


def code_attempts() -> list[tuple[str, bool]]:
    """Three model files that would run code if kdray followed them: (attempt, whether code ran)."""
    outcomes = []
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        module = root / "kdray_bench_marker.py"
        module.write_text(f"open({str(root / 'module-ran')!r}, 'w').write('ran')\n")
        sys.path.insert(0, str(root))
        attempts = {
            "model.json names package.module:factory": (
                lambda run: edit_json(student_spec(run), lambda s: {**s, "name": "kdray_bench_marker:factory"}),
                root / "module-ran"),
            "model.json names torch.hub:load beside a hubconf.py": (
                lambda run: ((run / "student" / "student" / "hubconf.py").write_text(
                    f"open({str(root / 'hub-ran')!r}, 'w').write('ran')\n"),
                    edit_json(student_spec(run), lambda s: {**s, "name": "torch.hub:load", "options": {
                        "repo_or_dir": str(run / "student" / "student"), "model": "m", "source": "local"}})),
                root / "hub-ran"),
            "model.pt is a pickle that calls open()": (
                lambda run: (run / "student" / "student" / "model.pt").write_bytes(
                    pickle.dumps(MarkerPickle(root / "pickle-ran"))),
                root / "pickle-ran"),
        }
        for name, (plant, marker) in attempts.items():
            run = make_run(root / name.replace(" ", "-").replace(".", "").replace(":", ""))
            plant(run)
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                kdray_main(["evaluate", str(run)])
                kdray_main(["predict", str(run), str(run / "data" / "dataset"), str(root / "out")])
            outcomes.append((name, marker.exists()))
        sys.path.remove(str(root))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the per-case table")
    args = parser.parse_args(argv)
    results = [(case[0], run_case(case[1], case[2])) for case in CASES]
    attempts = code_attempts()
    if args.markdown:
        print("| case | exit | refused by name | files lost | message |\n|---|---|---|---|---|")
        for name, result in results:
            message = re.sub(r"/tmp/tmp\w+", "TMP", result["message"]).replace("|", "\\|")[:160]
            print(f"| {name} | {result['code']} | {'yes' if result['named'] else 'NO'} | {result['lost']} | {message} |")
        print()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"bad inputs ({machine}): tried {len(results)}, refused by name {sum(r['named'] for _, r in results)}, "
          f"files lost {sum(r['lost'] for _, r in results)}, "
          f"code executed {sum(ran for _, ran in attempts)} of {len(attempts)} attempts")
    for name, ran in attempts:
        print(f"  {name}: {'CODE RAN' if ran else 'refused, nothing ran'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
