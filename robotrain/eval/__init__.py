"""Rolling policies out in simulators and scoring them.

- `synthetic`: the embedded reach task the synthetic dataset comes from (evaluated during training).
- `envs`: the gymnasium envs of `env=<name>` (PushT, ALOHA) and their observations as policy inputs.
- `rollout`: episodes in a vector env, scored as `lerobot-eval` scores them.
- `report`: `eval_info.json` in LeRobot's layout, and the printed summary.
- `__main__`: `python -m robotrain.eval`.
"""
