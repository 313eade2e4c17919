"""The simulated environments of `env=<name>`, built and read as LeRobot 0.6.1 does.

An env is a gymnasium env made with `gym.make(env.gym_id, **env.gym_kwargs)` and stepped in a
`SyncVectorEnv` of `eval.batch_size` copies. Its observations become what a policy reads from a
LeRobot dataset (LeRobot's `preprocess_observation`): `pixels` (H, W, C) uint8 -> `observation.image`
(C, H, W) float in [0, 1], a dict of cameras `pixels[cam]` -> `observation.images.<cam>`,
`agent_pos` -> `observation.state`, `environment_state` -> `observation.environment_state`; then
`eval.rename_map` renames them. A policy whose inputs do not match is refused before any rollout.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import traceback
from typing import Any

import numpy as np
import torch

from robotrain.config import EnvConfig
from robotrain.errors import UserError


def gymnasium_form(env: EnvConfig) -> EnvConfig:
    """`env` as a gymnasium env: the embedded task (no gym_id; the training loop evaluates it in
    process) is `robotrain/Reach-v0` (robotrain.eval.reach); others are as they are."""
    if env.gym_id is not None:
        return env
    return dataclasses.replace(env, gym_id="robotrain/Reach-v0", package="robotrain.eval.reach",
                               install="pip install 'robotrain[sim]' (for gymnasium)")


def make_vector_env(env: EnvConfig, num_envs: int, max_steps: int):
    """`num_envs` copies of the env, stepped in turn in this process. A sub-env whose episode has
    ended replays its last step instead of simulating an episode nobody reads (`FreezeAtEnd`)."""
    env = gymnasium_form(env)
    gym = _import_env(env)
    from robotrain.eval.freeze import FreezeAtEnd  # imports gymnasium, which _import_env found

    def make_one():
        return FreezeAtEnd(gym.make(env.gym_id, disable_env_checker=True, max_episode_steps=max_steps, **env.gym_kwargs))

    try:
        return gym.vector.SyncVectorEnv([make_one] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    except Exception as err:  # MuJoCo starting its renderer
        if env.gl and _is_gl_failure(err):
            raise _gl_error(env, err) from err
        raise


def _import_env(env: EnvConfig):
    """gymnasium, with `env.package` imported (which registers `env.gym_id`); one-line errors name the fix."""
    if env.gl:  # read by MuJoCo when it is first imported
        os.environ.setdefault("MUJOCO_GL", env.gl)
    try:
        import gymnasium as gym

        importlib.import_module(env.package)
    except ImportError as err:
        raise UserError(f"env={env.name} needs the {err.name or env.package} package: {env.install}") from err
    except Exception as err:  # e.g. MuJoCo failing to load its GL library at import
        if env.gl and _is_gl_failure(err):
            raise _gl_error(env, err) from err
        raise
    if env.gym_id not in gym.registry:
        raise UserError(f"importing {env.package} did not register {env.gym_id!r}; check env.gym_id "
                        f"(registered there: {', '.join(k for k in gym.registry if k.startswith(env.package))})")
    return gym


def _gl_error(env: EnvConfig, err: BaseException) -> UserError:
    reason = str(err).splitlines()[0] if str(err) else ""
    return UserError(f"env={env.name} cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                     f"({type(err).__name__}: {reason}): use MUJOCO_GL=egl with Mesa's EGL (Debian: apt-get install "
                     "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0), or MUJOCO_GL=osmesa with libosmesa6")


def _is_gl_failure(err: BaseException) -> bool:
    """Whether `err` came from loading or starting OpenGL (PyOpenGL, MuJoCo's or dm_control's renderer)."""
    text = f"{type(err).__name__} {err}".lower()
    if any(word in text for word in ("egl", "opengl", "osmesa", "glfw", "gl context", "libgl")):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return any(part in frame.filename for frame in frames for part in ("/OpenGL/", "dm_control/_render", "/mujoco/"))


def observation_features(observation_space, rename_map: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What the env gives a policy, `{key: {type, shape}}` as in a policy's `input_features`."""
    features: dict[str, dict[str, Any]] = {}
    spaces = observation_space.spaces
    pixels = spaces.get("pixels")
    if pixels is not None:
        cameras = pixels.spaces if hasattr(pixels, "spaces") else {None: pixels}
        for camera, space in cameras.items():
            height, width, channels = space.shape
            key = "observation.image" if camera is None else f"observation.images.{camera}"
            features[key] = {"type": "VISUAL", "shape": [channels, height, width]}
    if "environment_state" in spaces:
        features["observation.environment_state"] = {"type": "ENV", "shape": list(spaces["environment_state"].shape)}
    if "agent_pos" in spaces:
        features["observation.state"] = {"type": "STATE", "shape": list(spaces["agent_pos"].shape)}
    return {rename_map.get(key, key): feature for key, feature in features.items()}


def check_policy(policy_config, env: EnvConfig, vector_env, rename_map: dict[str, str]) -> None:
    """Refuse a policy whose inputs or action the env does not provide, naming the mismatch."""
    original = observation_features(vector_env.single_observation_space, {})
    unknown = sorted(set(rename_map) - set(original))
    if unknown:
        raise UserError(f"eval.rename_map renames {', '.join(unknown)}, which env={env.name} does not give; "
                        f"it gives {', '.join(original)}")
    given = observation_features(vector_env.single_observation_space, rename_map)
    offered = ", ".join(f"{key} {tuple(f['shape'])}" for key, f in given.items())
    for key, feature in (policy_config.input_features or {}).items():
        if key not in given:
            raise UserError(f"the policy reads {key} {tuple(feature['shape'])} but env={env.name} gives {offered}; "
                            f"map a name with eval.rename_map='{{<env name>: {key}}}' or evaluate in the env it was trained for")
        if list(given[key]["shape"]) != list(feature["shape"]):
            raise UserError(f"the policy reads {key} of shape {tuple(feature['shape'])} but env={env.name} gives "
                            f"{tuple(given[key]['shape'])}; evaluate in the env the policy was trained for")
    action = list((policy_config.output_features or {}).get("action", {}).get("shape", []))
    env_action = list(vector_env.single_action_space.shape)
    if action != env_action:
        raise UserError(f"the policy acts with {tuple(action)} actions but env={env.name} takes {tuple(env_action)}; "
                        "evaluate in the env the policy was trained for")


def to_policy_batch(observation: dict, rename_map: dict[str, str], device: torch.device,
                    task: list[str]) -> dict[str, Any]:
    """A vector env's observation as a policy batch (LeRobot's `preprocess_observation`, then renaming)."""
    batch: dict[str, Any] = {}
    pixels = observation.get("pixels")
    if pixels is not None:
        cameras = pixels if isinstance(pixels, dict) else {None: pixels}
        for camera, images in cameras.items():
            key = "observation.image" if camera is None else f"observation.images.{camera}"
            batch[key] = _image(images)
    if "environment_state" in observation:
        batch["observation.environment_state"] = torch.from_numpy(observation["environment_state"]).float()
    if "agent_pos" in observation:
        batch["observation.state"] = torch.from_numpy(observation["agent_pos"]).float()
    batch = {rename_map.get(key, key): value.to(device) for key, value in batch.items()}
    batch["task"] = task
    return batch


def _image(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1], as LeRobot divides."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return tensor.type(torch.float32) / 255


def tasks(vector_env) -> list[str]:
    """The language task of each sub-env, found as LeRobot's rollout finds it (else empty strings)."""
    for name in ("task_description", "task"):
        try:
            return [str(task) for task in vector_env.call(name)]
        except (AttributeError, NotImplementedError):
            continue
    return [""] * vector_env.num_envs
