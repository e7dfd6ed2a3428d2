"""Run `difffit` command lines in one child process under a memory limit and a time limit per command line.

`run_bounded(cases, env)` starts `python tests/bounded_cli.py`, which runs each case (an argv list) through the
CLI's real `main()` in turn and reports, per case, its exit code and stderr. The child's address space is capped
(RLIMIT_AS: what it holds after importing torch plus `EXTRA_BYTES`), so a command that allocates without bound
fails with a Python memory error, which `main` reports as an unexpected error (`refused_in_one_sentence` is then
False); a case that runs past `SECONDS` is stopped and reported as timed out. One child serves many cases: the
imports are paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXTRA_BYTES = 3 * 2**30  # what a case may allocate beyond the imports; a tiny model's run needs far less
SECONDS = 90  # per case
ROOT = Path(__file__).resolve().parents[1]
UNEXPECTED = "for the full traceback"  # main's hint after an error that is not a DiffFitError


def run_bounded(
    cases: list[list[str]], env: dict[str, str] | None = None, cwd: str | Path | None = None, seconds: int = SECONDS
) -> list[dict]:
    """[{"argv", "code", "err", "timed_out"}] for each case, in order; each case is stopped after `seconds`."""
    # The child imports difffit from this checkout, as `python -m` from its root would.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "BOUNDED_CLI_SECONDS": str(seconds), **(env or {})}
    done = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps([list(map(str, c)) for c in cases]),
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=seconds * len(cases) + 120,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), f"the child stopped early ({done.returncode}): {done.stderr[-3000:]}"
    return results


def refused_in_one_sentence(result: dict) -> bool:
    """An exit other than 0, with difffit's own `Error:` sentence (not an unexpected exception's, not a timeout)."""
    err = result["err"]
    return (
        result["code"] not in (0, None)
        and not result["timed_out"]
        and "Traceback" not in err
        and UNEXPECTED not in err
        and ("Invalid value" in err or any(line.startswith("Error:") for line in err.splitlines()))
    )


def _child() -> None:
    import io
    import resource
    import signal
    from contextlib import redirect_stderr, redirect_stdout

    import torch  # noqa: F401 - imported before the limit is measured

    import difffit.cli
    from difffit.engine import progress

    torch.set_num_threads(1)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + EXTRA_BYTES, size + EXTRA_BYTES))

    class TimedOut(BaseException):
        pass

    def alarm(*_):
        raise TimedOut

    signal.signal(signal.SIGALRM, alarm)
    for argv in json.loads(sys.stdin.read()):
        err, out = io.StringIO(), io.StringIO()
        progress.stderr_console.file = err
        sys.argv = ["difffit", *argv]
        code, timed_out = None, False
        signal.alarm(int(os.environ.get("BOUNDED_CLI_SECONDS", SECONDS)))
        try:
            with redirect_stderr(err), redirect_stdout(out):
                difffit.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except TimedOut:
            timed_out = True
        except MemoryError:
            code, err = 1, io.StringIO(f"Error: MemoryError {UNEXPECTED}")
        finally:
            signal.alarm(0)
        sys.__stdout__.write(
            json.dumps({"argv": argv, "code": code, "err": err.getvalue(), "timed_out": timed_out}) + "\n"
        )
        sys.__stdout__.flush()


if __name__ == "__main__":
    _child()


def cli_run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """conftest's run_cli, with stderr's lines joined: the console wraps long sentences at the terminal's width."""
    from conftest import run_cli

    code, out, err = run_cli(monkeypatch, capsys, *args)
    return code, out, err.replace("\n", "")
