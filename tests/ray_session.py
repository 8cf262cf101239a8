"""Starting the local Ray instance of a test session (both suites' ``ray_local`` fixtures)."""

from __future__ import annotations


def start_local_ray(tmp_path_factory):
    """A local Ray instance for a test session (token auth off explicitly: in Ray 2.60
    ray.init() would otherwise turn it on and write ~/.ray/auth_token, making behaviour
    depend on test order). No dashboard: no test of the session's instance uses the state API."""
    import os

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    return ray
