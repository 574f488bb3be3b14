"""What several test files share."""

import numpy as np


def record_env_actions(module, monkeypatch) -> list:
    """Make module.make_vec_env's envs keep every action they are given; returns the list they fill."""
    actions, real = [], module.make_vec_env

    def recording(*args, **kwargs):
        envs = real(*args, **kwargs)
        step = envs.step
        envs.step = lambda a: actions.append(np.array(a)) or step(a)
        return envs

    monkeypatch.setattr(module, "make_vec_env", recording)
    return actions
