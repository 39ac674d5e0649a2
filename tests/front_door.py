"""The doors a user walks through, opened the way the user opens them: the `nanodiffusion`
command run as a subprocess, and `nanodiffusion serve` started as one."""
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from live_server import free_port


def command():
    """The installed `nanodiffusion` console script beside this Python (as the README runs
    it), else the module."""
    script = Path(sys.executable).parent / "nanodiffusion"
    if script.exists():
        return [str(script)]
    found = shutil.which("nanodiffusion")
    return [found] if found else [sys.executable, "-m", "nanodiffusion.cli"]


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run `nanodiffusion ARGS...`; the CompletedProcess (text output)."""
    return subprocess.run([*command(), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@contextmanager
def served(*args, timeout=60):
    """`nanodiffusion serve --port P ARGS...` as a subprocess; yields (base URL, process) once
    /health answers; stops it after, its output kept on the process (`.log`)."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([*command(), "serve", "--port", str(port), *map(str, args)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"serve did not answer /health within {timeout} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        proc.log = log.read()
        log.close()
        Path(log.name).unlink(missing_ok=True)
