"""The README's commands, pasted as written into an empty directory, in order: the certificates, the
server, the Python example against it, the Hydra train command and a recipe (like the notebook test,
for the page a new user reads first; the Hydra commands' epochs are cut to 8 batches: the recipe's
bf16 is slow on a CPU, and ``test_hydra_apps.py`` trains the same configs). ``make demo`` and
``make test`` are what CI itself runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LIMITS = "+trainer.limit_train_batches=8 +trainer.limit_val_batches=2"  # appended to the Hydra commands


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def _commands(block: str) -> list[str]:
    """A shell block's commands: comments dropped, ``source .venv/bin/activate`` left to the PATH below."""
    lines = [line.split(" #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "source "))]


def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    run = dict(shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    setup = next(b for b in _blocks("bash") if "lightning-split serve" in b)
    certs, serve = _commands(setup)
    done = subprocess.run(certs, timeout=120, **run)
    assert done.returncode == 0, done.stderr
    server = subprocess.Popen(serve, shell=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said = next(line for line in server.stdout if "lightning-split: serving" in line or "Error" in line)
        assert "with mutual TLS" in said, said
        example = tmp_path / "example.py"
        example.write_text(next(b for b in _blocks("python") if "SplitStrategy(" in b))
        done = subprocess.run(f"{sys.executable} {example}", timeout=600, **run)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "tensor([[" in done.stdout  # the generated tokens
        hydra_commands = re.findall(r"`(lightning-split train [^`]*)`", README.read_text())
        assert len(hydra_commands) >= 2  # the train app, and a recipe by name
        for command in hydra_commands:  # as written, the epoch cut short: a recipe's bf16 on a CPU is slow
            done = subprocess.run(f"{command} {LIMITS}", timeout=600, **run)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
