"""Every example command in README.md runs: the test reads the ```bash blocks of the Examples
section, shrinks the runs (few steps, a small dataset) and points them at the local stand-ins:
the Hub emulator, the HF Jobs emulator, the real single-node SLURM cluster, a tiny offline
SmolVLA, pi0 and pi0.5 and a LeRobot dataset from tests/data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: What every example gets, replacing the README's own values for these keys.
SHRINK = {"steps": "4", "batch_size": "8", "dataset.synthetic.num_episodes": "20", "eval.episodes": "4",
          "eval.at_start": "false", "log_every": "2", "checkpoint.every": "2", "scheduler.warmup_steps": "1"}
TINY_DATASET = REPO_ROOT / "tests" / "data" / "lerobot_v3_tiny"
VIDEO_DATASET = REPO_ROOT / "tests" / "data" / "lerobot_v3_video"  # cameras as AV1 MP4, written by LeRobot


def example_blocks() -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    examples = text.split("## Examples", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", examples, re.S)
    # A command continued over lines with a backslash is one command.
    return [[line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


BLOCKS = example_blocks()


def test_the_readme_has_examples_for_every_feature():
    commands = " ".join(" ".join(b) for b in BLOCKS)
    for feature in ("peft=lora", "job=slurm", "job=hf", "resume=hub:", "hub.push_checkpoints=true",
                    "dataset=hub", "distributed.processes=2", "torchrun", "tracker=", "dataset.synthetic.video=true",
                    "dataset.root=/path/to/so101_pick", "precision=bf16", "grad_accum_steps=", "ema.enabled=true",
                    "dataset.image_transforms.enable=true", "dataset=mixture", "dataset.rename_map="):
        assert feature in commands, feature


class StandIns:
    """Maps a README command onto this machine's stand-ins; one per test."""

    def __init__(self, tmp_path: Path, hub, bases: dict[str, tuple[Path, list[str]]]):
        self.tmp, self.hub, self.bases = tmp_path, hub, bases
        self.repo = f"you/reach-mlp-{tmp_path.name[-24:].replace('_', '-')}"

    def argv(self, command: str, index: int) -> list[str]:
        command = command.replace("you/reach-mlp", self.repo).replace("@1000", "@2")
        command = command.replace("root: /data/place", f"root: {VIDEO_DATASET}")  # a mixture's local member
        words = shlex.split(command)
        if words[0] == "torchrun":  # run as the module, from this interpreter
            words = ["-m", "torch.distributed.run", *words[1:]]
        else:
            assert words[:3] == ["python", "-m", "robotrain"], command
            words = words[1:]
        head, args = words[: words.index("robotrain") + 1], words[words.index("robotrain") + 1:]
        args = [self._local(a) for a in args if a.split("=", 1)[0] not in SHRINK or a.startswith("steps=4000")]
        args = ["steps=8" if a.startswith("steps=4000") else a for a in args]
        for base, (_, base_args) in self.bases.items():
            if base in command:
                args += base_args
        shrink = [f"{k}={v}" for k, v in SHRINK.items() if not any(a.startswith(f"{k}=") for a in args)]
        if any(a.startswith("job=hf") for a in args):
            shrink.append(f"+job.env.ROBOTRAIN_CACHE={self.tmp / 'cache'}")
        extra = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={self.tmp / str(index)}"]
        if "-m" in args:  # a sweep: its points share a sweep dir instead
            extra = [f"hydra.sweep.dir={self.tmp / 'sweep'}"]
        return [*head, *args, *shrink, *extra]

    def _local(self, arg: str) -> str:
        if arg.startswith("dataset.root=/path/to/so101_pick"):
            return f"dataset.root={VIDEO_DATASET}"
        if arg.startswith("dataset.root=/path/to/"):
            return f"dataset.root={TINY_DATASET}"
        base = arg.removeprefix("policy.pretrained_path=")
        if base in self.bases:
            return f"policy.pretrained_path={self.bases[base][0]}"
        if arg.startswith("hydra.run.dir=outputs/"):
            return f"hydra.run.dir={self.tmp / arg.split('/', 1)[1]}"
        return arg


#: The README's pretrained Hub policies, each stood in for by a tiny one trained offline.
BASES = ("lerobot/smolvla_base", "lerobot/pi0_base", "lerobot/pi05_base")


@pytest.fixture(scope="module")
def pretrained_base(module_cli, tmp_path_factory):
    """`base id -> (a tiny pretrained folder of that policy, the CLI args that make it tiny)`,
    each trained (2 steps, offline) on first use."""
    from tests.paligemma_tiny import PI0_TINY, build_tiny_paligemma_tokenizer
    from tests.smolvlm_tiny import build_tiny_smolvlm
    from tests.test_policy_smolvla import TINY_CLI

    built: dict[str, tuple[Path, list[str]]] = {}

    def tiny_cli(base: str) -> list[str]:
        if base == "lerobot/smolvla_base":
            vlm = build_tiny_smolvlm(tmp_path_factory.mktemp("vlm") / "tiny_smolvlm")
            return ["policy=smolvla", f"policy.vlm_model_name={vlm}", *TINY_CLI]
        tokenizer = build_tiny_paligemma_tokenizer(tmp_path_factory.mktemp("paligemma") / "tokenizer")
        return [f"policy={base.split('/')[1].removesuffix('_base')}", f"policy.tokenizer_name={tokenizer}", *PI0_TINY]

    def get(base: str) -> tuple[Path, list[str]]:
        if base not in built:
            args = tiny_cli(base)
            run_dir = tmp_path_factory.mktemp(base.split("/")[1])
            done = module_cli.run(*args, "steps=2", "batch_size=4", "eval.enabled=false",
                                  "dataset.synthetic.num_episodes=20", f"hydra.run.dir={run_dir}")
            assert done.returncode == 0, done.stderr[-3000:]
            built[base] = run_dir / "checkpoints" / "000002" / "pretrained_model", args[1:]
        return built[base]

    return get


def _needs(block: list[str]) -> set[str]:
    text = " ".join(block)
    return {name for name, marker in (("slurm", "job=slurm"), *((b, b) for b in BASES)) if marker in text}


@pytest.mark.parametrize("block", BLOCKS, ids=[b[0][:60] for b in BLOCKS])
def test_readme_example_runs(block, request, cli, hub, tmp_path):
    if "slurm" in _needs(block):
        request.getfixturevalue("slurm")
    bases = {base: request.getfixturevalue("pretrained_base")(base) for base in BASES if base in _needs(block)}
    cli.env.update(hub.env)
    cli.env["HF_LEROBOT_HOME"] = str(tmp_path / "lerobot")
    cli.env["ROBOTRAIN_CACHE"] = str(tmp_path / "cache")
    if any("dataset=hub" in c for c in block):
        _upload_dataset(hub, "lerobot/my_dataset")
    if any("dataset=mixture" in c for c in block):  # its Hub member; the other is on disk
        _upload_dataset(hub, "user/so101_pick", VIDEO_DATASET)
    stand_ins = StandIns(tmp_path, hub, bases)
    for index, command in enumerate(block):
        argv = stand_ins.argv(command, index)
        done = cli.run(*argv[2:]) if argv[:2] == ["-m", "robotrain"] else _run_module(cli, argv)
        assert done.returncode == 0, f"{command}\n-> {' '.join(argv)}\n{done.stderr[-3000:]}"


def _run_module(cli, argv: list[str]):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *argv], cwd=cli.cwd, env=cli.env, capture_output=True, text=True,
                          timeout=600)


def _upload_dataset(hub, repo: str, folder: Path = TINY_DATASET) -> None:
    hub.run_python(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({repo!r}, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id={repo!r}, repo_type="dataset", folder_path={str(folder)!r})
    """)
