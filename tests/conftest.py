"""Shared fixtures: one local Ray instance for the whole session, small synthesized audio."""

from __future__ import annotations

import os

# Set before Ray is imported anywhere: no token file side effects, readable per-worker logs,
# and no attempt to attach to a stray cluster address left in the environment.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis: a failure must reproduce. Every profile prints the reproduce blob
# (@reproduce_failure) with the falsifying example; under CI (CI set and non-empty, as CI sets
# it) the examples are derandomized -- the same ones on every run, no example database, no
# deadline on a slow shared machine -- so a red CI run is red again on a laptop with `CI=true`.
# HYPOTHESIS_PROFILE=ci|dev picks one by hand (`make mutation` uses ci: a mutant must not be
# killed or spared by luck). Both start from Hypothesis's defaults, not from the CI profile it
# loads by itself whenever a CI variable exists.
_DEFAULT = settings.get_profile("default")
settings.register_profile("dev", _DEFAULT, print_blob=True)
settings.register_profile(
    "ci",
    _DEFAULT,
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

# Small object store: the streaming tests rely on it being much smaller than the data they push.
RAY_OBJECT_STORE_BYTES = 200 * 1024**2


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance shared by every test that needs Ray (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            num_gpus=0,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    # Shut down once, at the end of the session.
    ray.shutdown()


# The suite's tiers are its folders; each test gets its folder's marker, so
# `pytest -m unit` (seconds) or `pytest -m "not integration"` picks a tier without a list.
TIERS = ("unit", "integration", "faults")


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
