"""`python -m robotrain.eval` in LeRobot's simulators: PushT (gym-pusht) and ALOHA (gym-aloha,
MuJoCo rendered headless through EGL), with untrained tiny ACT and Diffusion policies and a
hand-written PushT controller that succeeds (tests/sim_envs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from robotrain.config import EnvConfig, conf_dir
from robotrain.errors import UserError
from robotrain.eval import report, rollout
from robotrain.policies.base import features_from_dataset
from tests.conftest import assert_one_line_error, make_cli
from tests.sim_policies import FEATURES, save_tiny_policy

pytest.importorskip("gym_pusht", reason="needs the sim extra: pip install 'robotrain[sim]'")


def env_config(name: str, **changes) -> EnvConfig:
    values = OmegaConf.to_container(OmegaConf.load(conf_dir() / "env" / f"{name}.yaml"))
    values.pop("defaults")
    return EnvConfig(**{**values, **changes})


def run_eval(cli, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robotrain.eval", *args], cwd=cli.cwd, env=cli.env,
                          capture_output=True, text=True, timeout=timeout)


def outcomes(result: rollout.TaskResult) -> list[tuple]:
    return [(e.seed, e.steps, e.success, e.sum_reward, e.max_reward) for e in result.episodes]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-policies")
    return {name: save_tiny_policy(kind, task, root / name)
            for name, kind, task in [("act_pusht", "act", "pusht"), ("diffusion_pusht", "diffusion", "pusht"),
                                     ("act_aloha", "act", "aloha"), ("diffusion_aloha", "diffusion", "aloha")]}


@pytest.fixture
def eval_cli(robotrain_cache, tmp_path):
    return make_cli(robotrain_cache, tmp_path)


def test_pusht_evaluation_writes_lerobots_eval_info_videos_and_a_summary(eval_cli, folders, tmp_path):
    args = [f"policy.path={folders['act_pusht']}", "env=pusht", "eval.episodes=3", "eval.batch_size=2",
            "env.max_steps=30", "eval.video_episodes=2"]
    first = run_eval(eval_cli, *args, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    info = json.loads((tmp_path / "a" / "eval_info.json").read_text())
    assert list(info) == ["per_task", "per_group", "overall", "per_episode"]
    (task,) = info["per_task"]
    assert task["task_group"] == "pusht" and task["task_id"] == 0
    assert list(task["metrics"]) == ["sum_rewards", "max_rewards", "successes", "video_paths"]
    assert list(info["overall"]) == ["avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "eval_s",
                                     "eval_ep_s", "video_paths"]
    assert list(info["per_group"]["pusht"]) == ["avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes",
                                                "video_paths"]
    assert [e["seed"] for e in info["per_episode"]] == [1000, 1001, 1002]
    assert [e["episode_ix"] for e in info["per_episode"]] == [0, 1, 2]
    assert task["metrics"]["sum_rewards"] == [e["sum_reward"] for e in info["per_episode"]]
    assert info["overall"]["avg_sum_reward"] == pytest.approx(np.mean(task["metrics"]["sum_rewards"]))
    assert info["overall"]["n_episodes"] == 3
    videos = [tmp_path / "a" / "videos" / "pusht_0" / f"eval_episode_{n}.mp4" for n in range(2)]
    assert task["metrics"]["video_paths"] == [str(p) for p in videos]
    import av

    with av.open(str(videos[0])) as container:  # reset + 30 steps, at PushT's 384x384 render size
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 31 and frames[0].shape == (384, 384, 3)
    assert "success 0.0% over 3 episodes" in first.stdout and "eval_info.json" in first.stdout

    again = run_eval(eval_cli, *args, f"hydra.run.dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = json.loads((tmp_path / "b" / "eval_info.json").read_text())
    for one in (info, repeat):  # all but the timings and where the videos are
        for key in ("eval_s", "eval_ep_s", "video_paths"):
            one["overall"].pop(key)
        one["per_group"]["pusht"].pop("video_paths")
        one["per_task"][0]["metrics"].pop("video_paths")
    assert repeat == info


@pytest.mark.parametrize("name", ["act_pusht", "diffusion_pusht"])
def test_results_are_a_function_of_the_seeds_not_of_the_vector_size(folders, name):
    from robotrain import pretrained

    policy = pretrained.load(str(folders[name]))
    env = env_config("pusht")

    def run(batch_size):
        return outcomes(rollout.evaluate(policy, env, episodes=4, batch_size=batch_size, seed=7, max_steps=40,
                                         rename_map={}))

    one, four, four_again = run(1), run(4), run(4)
    assert four_again == four  # deterministic, diffusion's sampling noise included
    # Episode by episode the same; batched matmuls round differently from single rows (~1e-7), so rewards
    # agree to a tolerance, over episodes short enough for PushT's contacts not to amplify that.
    assert [o[:3] for o in one] == [o[:3] for o in four]
    np.testing.assert_allclose([o[3:] for o in one], [o[3:] for o in four], rtol=1e-4, atol=1e-6)
    assert any(o[3] > 0 for o in one)  # the policy moved the T: rewards are read, not all zero


def test_a_controller_that_solves_pusht_scores_success(tmp_path):
    from tests.sim_envs import GYM_ID, PushLeft

    env = env_config("pusht", gym_id=GYM_ID, package="tests.sim_envs")
    inputs, outputs = features_from_dataset(FEATURES["pusht"])
    controller = PushLeft(SimpleNamespace(input_features=inputs, output_features=outputs))
    for batch_size in (1, 4):
        result = rollout.evaluate(controller, env, episodes=4, batch_size=batch_size, seed=1000, max_steps=60,
                                  rename_map={})
        # Even seeds start near the goal, where the controller pushes the T home; odd ones do not.
        assert [e.success for e in result.episodes] == [True, False, True, False]
        solved = result.episodes[0]
        assert solved.steps < 60 and solved.max_reward == 1.0
    info = report.eval_info([result])
    assert info["overall"]["pc_success"] == 50.0
    assert [e["success"] for e in info["per_episode"]] == [True, False, True, False]


def test_the_embedded_task_evaluates_a_quickstart_run_and_its_expert_succeeds(eval_cli, trained_run, tmp_path):
    done = run_eval(eval_cli, f"policy.path={trained_run}", "env=synthetic", "eval.episodes=3", "eval.batch_size=3",
                    f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert info["per_task"][0]["task_group"] == "synthetic" and info["overall"]["n_episodes"] == 3

    from tests.sim_envs import ReachExpert

    expert = ReachExpert()
    result = rollout.evaluate(expert, env_config("synthetic"), episodes=4, batch_size=2, seed=0, max_steps=50,
                              rename_map={})
    assert all(e.success and e.sum_reward == 1.0 and e.steps < 50 for e in result.episodes)
    assert report.eval_info([result])["overall"]["pc_success"] == 100.0


def test_a_policy_for_other_features_is_refused_before_any_rollout(eval_cli, folders, tmp_path):
    done = run_eval(eval_cli, f"policy.path={folders['act_aloha']}", "env=pusht", f"hydra.run.dir={tmp_path}")
    line = assert_one_line_error(done, "observation.images.top")
    assert "eval.rename_map" in line
    assert not (tmp_path / "eval_info.json").exists()


def test_rename_map_maps_an_env_camera_onto_the_policys_name(tmp_path):
    from robotrain import pretrained

    folder = save_tiny_policy("act", "pusht", tmp_path / "renamed", rename={"observation.image": "observation.images.top"})
    policy = pretrained.load(str(folder))
    env = env_config("pusht")
    with pytest.raises(UserError, match="observation.images.top"):
        rollout.evaluate(policy, env, episodes=1, batch_size=1, seed=0, max_steps=2, rename_map={})
    result = rollout.evaluate(policy, env, episodes=1, batch_size=1, seed=0, max_steps=2,
                              rename_map={"observation.image": "observation.images.top"})
    assert result.episodes[0].steps == 2
    with pytest.raises(UserError, match="does not give"):
        rollout.evaluate(policy, env, episodes=1, batch_size=1, seed=0, max_steps=2,
                         rename_map={"observation.images.front": "observation.images.top"})


@pytest.mark.parametrize("name, policy_name", [("aloha_insertion", "act_aloha"), ("aloha_transfer_cube", "act_aloha"),
                                               ("aloha_insertion", "diffusion_aloha")])
def test_aloha_rolls_out_headless(folders, name, policy_name):
    pytest.importorskip("gym_aloha", reason="needs the sim extra: pip install 'robotrain[sim]'")
    from robotrain import pretrained

    policy = pretrained.load(str(folders[policy_name]))
    result = rollout.evaluate(policy, env_config(name), episodes=2, batch_size=2, seed=0, max_steps=3,
                              rename_map={})
    assert [e.steps for e in result.episodes] == [3, 3]
    assert [e.seed for e in result.episodes] == [0, 1]
    assert all(e.success is False for e in result.episodes)


def test_a_gl_backend_that_cannot_render_is_one_line_naming_the_fix(eval_cli, folders, tmp_path):
    pytest.importorskip("gym_aloha", reason="needs the sim extra: pip install 'robotrain[sim]'")
    cli = SimpleNamespace(cwd=eval_cli.cwd, env={**eval_cli.env, "MUJOCO_GL": "osmesa"})  # no libosmesa6 here
    done = run_eval(cli, f"policy.path={folders['act_aloha']}", "env=aloha_insertion", "env.max_steps=2",
                    f"hydra.run.dir={tmp_path}")
    assert "MUJOCO_GL=egl" in assert_one_line_error(done, "cannot render with MUJOCO_GL=osmesa")


BAD = {
    "no policy": ([], "policy.path must be set"),
    "a policy path that does not exist": (["policy.path=/nonexistent/pretrained_model"], "does not exist"),
    "an env package that is not installed": (["env.package=not_a_sim_package"], "pip install 'robotrain[sim]'"),
    "an env that does not exist": (["env=mujoco_soccer"], "no option 'mujoco_soccer'"),
    "zero episodes": (["eval.episodes=0"], "eval.episodes must be > 0"),
    "a bad hub spec": (["policy.path=hub:not a repo"], "hub:user/repo"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(eval_cli, folders, tmp_path, case):
    extra, expected = BAD[case]
    policy = [] if case in ("no policy",) or any(a.startswith("policy.path") for a in extra) else \
        [f"policy.path={folders['act_pusht']}"]
    done = run_eval(eval_cli, *policy, *extra, f"hydra.run.dir={tmp_path / 'out'}")
    assert_one_line_error(done, expected)
    assert not (tmp_path / "out" / "eval_info.json").exists()


def test_help_lists_the_envs_and_options_also_as_a_subcommand(eval_cli):
    script = Path(sys.executable).parent / "robotrain"  # the console script: `robotrain eval ...`
    for done in (run_eval(eval_cli, "--help"),
                 subprocess.run([str(script), "eval", "--help"], env=eval_cli.env, capture_output=True, text=True)):
        assert done.returncode == 0, done.stderr
        for text in ("env=pusht", "env=aloha_insertion", "eval.rename_map", "eval.batch_size", "policy.path"):
            assert text in done.stdout


def test_a_checkpoint_on_the_hub_is_evaluated_from_its_step(hub, hub_repo, folders, eval_cli, tmp_path):
    hub.run_python("""
        import sys
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(sys.argv[1])
        api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], path_in_repo="checkpoints/000010/pretrained_model")
    """, args=[hub_repo, str(folders["act_pusht"])])
    cli = SimpleNamespace(cwd=eval_cli.cwd, env=hub.subprocess_env({"ROBOTRAIN_CACHE": eval_cli.env["ROBOTRAIN_CACHE"],
                                                                    "OMP_NUM_THREADS": "1"}))
    done = run_eval(cli, f"policy.path=hub:{hub_repo}@10", "eval.episodes=1", "env.max_steps=5",
                    "eval.video_episodes=0", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    from robotrain import pretrained

    here = rollout.evaluate(pretrained.load(str(folders["act_pusht"])), env_config("pusht"), episodes=1,
                            batch_size=1, seed=1000, max_steps=5, rename_map={})
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert info["per_episode"] == [e.as_lerobot() for e in here.episodes]
