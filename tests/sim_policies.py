"""Untrained tiny policies with the features of LeRobot's simulator datasets (pusht, aloha), saved
as pretrained_model/ folders for `python -m robotrain.eval` (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from robotrain import policies
from robotrain.policies import policy_config_class

#: The features of lerobot/pusht and lerobot/aloha_sim_* (info.json form).
FEATURES = {
    "pusht": {
        "observation.image": {"dtype": "video", "shape": [96, 96, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [2]},
    },
    "aloha": {
        "observation.images.top": {"dtype": "video", "shape": [480, 640, 3]},
        "observation.state": {"dtype": "float32", "shape": [14]},
        "action": {"dtype": "float32", "shape": [14]},
    },
}

#: Mean and std of states and actions: PushT's pixel coordinates (0..512), ALOHA's joint angles.
_SCALE = {"pusht": (256.0, 100.0), "aloha": (0.0, 0.5)}

TINY_FIELDS = {
    "act": {"pretrained_backbone_weights": None, "dim_model": 32, "n_heads": 2, "dim_feedforward": 64,
            "n_encoder_layers": 1, "n_decoder_layers": 1, "n_vae_encoder_layers": 1, "latent_dim": 8,
            "chunk_size": 10, "n_action_steps": 5},
    "diffusion": {"n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "down_dims": [32, 64], "kernel_size": 3,
                  "n_groups": 8, "diffusion_step_embed_dim": 32, "spatial_softmax_num_keypoints": 8,
                  "num_train_timesteps": 10, "crop_shape": [84, 84]},
}


def stats(task: str) -> dict:
    mean, std = _SCALE[task]
    out = {}
    for key, feature in FEATURES[task].items():
        if feature["dtype"] == "video":
            shape = (3, 1, 1)
            out[key] = {"mean": torch.full(shape, 0.5), "std": torch.full(shape, 0.25),
                        "min": torch.zeros(shape), "max": torch.ones(shape)}
        else:
            n = feature["shape"][0]
            out[key] = {"mean": torch.full((n,), mean), "std": torch.full((n,), std),
                        "min": torch.full((n,), mean - 2 * std), "max": torch.full((n,), mean + 2 * std)}
    return out


def save_tiny_policy(policy_type: str, task: str, folder: Path, seed: int = 0, rename: dict | None = None,
                     **fields) -> Path:
    """An untrained tiny `policy_type` for `task`'s features (`rename`d: dataset name -> the policy's),
    saved as a pretrained_model/ folder."""
    config = policy_config_class(policy_type)(type=policy_type, **{**TINY_FIELDS[policy_type], **fields})
    rename = rename or {}
    features = {rename.get(k, k): v for k, v in FEATURES[task].items()}
    task_stats = {rename.get(k, k): v for k, v in stats(task).items()}
    torch.manual_seed(seed)
    policy = policies.make(config, features, task_stats)
    policy.save_pretrained(folder)
    return folder


def write_pusht_like_dataset(root: Path, episodes: int = 4, length: int = 24, seed: int = 0) -> Path:
    """A small LeRobot v3.0 dataset with lerobot/pusht's features (PNG frames, random content), to
    train policies that PushT can evaluate."""
    import numpy as np

    from robotrain.data.writing import write_dataset

    rng = np.random.default_rng(seed)
    features = {key: {**ft, "dtype": "image" if ft["dtype"] == "video" else ft["dtype"],
                      "names": ["height", "width", "channels"] if ft["dtype"] == "video" else None}
                for key, ft in FEATURES["pusht"].items()}

    def episode():
        return {"observation.image": rng.integers(0, 256, (length, 96, 96, 3), dtype=np.uint8),
                "observation.state": rng.uniform(50, 450, (length, 2)).astype(np.float32),
                "action": rng.uniform(50, 450, (length, 2)).astype(np.float32),
                "task": "Push the T-shaped block onto the T-shaped target."}

    write_dataset(root, repo_id="robotrain_tests/pusht_like", fps=10, features=features,
                  episodes=(episode() for _ in range(episodes)))
    return root
