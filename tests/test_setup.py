"""The README's two commands: the set-up installs only what the main job needs and runs it; CI runs the
README's test command exactly."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _setup_section_commands() -> tuple[str, str]:
    """The set-up command and the test command, the two bash blocks of the README's "Set-up" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    setup, tests = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    return setup.strip(), tests.strip()


def test_ci_runs_the_readme_test_command_exactly():
    _, tests = _setup_section_commands()
    assert '-e ".[test]"' in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]


def test_setup_installs_only_the_main_jobs_extra():
    setup, _ = _setup_section_commands()
    installs = re.findall(r'pip install -e "\.\[([\w,]+)\]"', setup)
    assert installs == ["torchvision"]
    (extra,) = re.findall(r"^torchvision = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert [re.split(r"[<>=]", d.strip(' "'))[0] for d in extra.split(",")] == ["torchvision"]


def test_the_main_job_runs_without_the_test_extras(tmp_path):
    setup, _ = _setup_section_commands()
    command = shlex.split(setup.split("&&")[-1])
    assert Path(command[0]).name == "bnfold"
    # what the test extras bring is not there
    hidden = tmp_path / "hidden"
    for name in ("timm", "safetensors", "onnx", "onnxruntime", "fastai", "transformers", "hypothesis"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))
    # one thread, as in the other tests: on a busy machine a second one makes each op wait for it
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", *command[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ResNet (traced with example_inputs): 53 norm layers folded, 0 kept")
    assert "\nlatency:    " in done.stdout and "\nspread:     " in done.stdout
