"""robotrain works as users install it: from a wheel in a fresh virtual environment (conf/
shipped inside the package), and the README's test command is the one CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT, TINY


def readme_test_command() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Test", 1)[1]
    return re.search(r"^    (\S.*)$", section, re.M).group(1).strip()


def test_ci_runs_the_test_command_written_in_the_readme():
    ci = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == readme_test_command()


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path, robotrain_cache):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO_ROOT)],
                   check=True)
    wheel = next(wheels.glob("robotrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "robotrain/conf/config.yaml" in names and "robotrain/conf/policy/mlp.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True)

    workdir = tmp_path / "elsewhere"  # not the checkout, so nothing is imported from the source tree
    workdir.mkdir()
    where = subprocess.run([python, "-c", "import robotrain.config as c; print(c.conf_dir())"],
                           cwd=workdir, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "ROBOTRAIN_CACHE": str(robotrain_cache),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-m", "robotrain", *TINY, "steps=5", "hydra.run.dir=run"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (workdir / "run" / "checkpoints" / "000005" / "pretrained_model" / "model.safetensors").is_file()
    console = subprocess.run([str(venv / "bin" / "robotrain"), "--cfg", "job"], cwd=workdir, env=env,
                             capture_output=True, text=True)
    assert console.returncode == 0 and "policy:" in console.stdout
