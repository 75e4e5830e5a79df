"""Starting or joining Ray the same way from the CLI, from `ray job submit` jobs and from tests."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Quiet defaults for the driver and every Ray worker: no per-load tables and progress bars from
# transformers / Hugging Face Hub / Ray Data in the middle of the pipeline's own progress lines.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def ensure_ray(ray_cfg=None) -> None:
    """Join the configured cluster, the cluster a job was submitted to, or start a local Ray.

    - already initialised (a test fixture, a Tune trial): nothing to do;
    - ``ray.address`` set in the config: join it;
    - ``RAY_ADDRESS`` in the environment (set by ``ray job submit``): ``ray.init()`` with no
      arguments, as Ray Jobs expect (passing num_cpus there is an error);
    - otherwise start a fresh local instance with ``address="local"`` so a stale
      ``/tmp/ray/ray_current_cluster`` file is never joined by accident.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_environment()
    quiet = {"log_to_driver": True, "runtime_env": {"env_vars": dict(QUIET_ENV)}}
    address = getattr(ray_cfg, "address", None) if ray_cfg is not None else None
    if address:
        ray.init(address=address, **quiet)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        kwargs = {"include_dashboard": False}
        num_cpus = getattr(ray_cfg, "num_cpus", None)
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        store_mb = getattr(ray_cfg, "object_store_memory_mb", None)
        if store_mb:
            kwargs["object_store_memory"] = int(store_mb) * 1024**2
        ray.init(address="local", **kwargs, **quiet)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("ray: %s", ray.cluster_resources())
