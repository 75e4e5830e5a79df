"""cluster.yaml and the job upload, checked offline with Ray's own code (no cloud calls).

`ray up` validates a cluster config only after it has started talking to the provider; these
tests run the offline half of that validation (Ray's JSON schema, then ``prepare_config`` +
``validate_config``, the steps ``ray up`` runs before ``bootstrap_config``), make sure broken
copies are rejected, and package the repository the way ``ray job submit --working-dir .`` does
to check what `.rayignore` leaves out.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

# Private Ray helpers: the functions `ray up` and the job client call. They are pinned by the
# exact ray version in constraints.txt; if an upgrade moves them, these imports say so loudly.
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
REPO_MOUNT_SOURCE = "."


def validate_offline(config: dict) -> dict:
    """Everything `ray up` checks before its first cloud call, plus one rule of ours.

    Returns the prepared config (provider defaults merged, setup commands merged, per-type worker
    bounds filled in), as the autoscaler would see it.
    """
    jsonschema.validate(config, SCHEMA)  # the file as written: unknown keys, types, integers
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # schema again + head type known + sum(min_workers) <= max_workers
    # Ray clamps a node type's min_workers to its max_workers without a word
    # (resource_demand_scheduler: min(min_workers, max_workers)); a config saying "keep 6 GPU
    # nodes up, at most 4" is a mistake we would rather hear about.
    for name, node_type in prepared["available_node_types"].items():
        if node_type["min_workers"] > node_type["max_workers"]:
            raise ValueError(
                f"available_node_types.{name}: min_workers ({node_type['min_workers']}) > "
                f"max_workers ({node_type['max_workers']})"
            )
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return validate_offline(raw)


def test_cluster_yaml_passes_ray_validation(prepared):
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    # The head takes no Ray work; the prepared config gives it no workers of its own type.
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["head"]["max_workers"] == 0
    # GPU workers scale from zero, one whole GPU each.
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] >= 1
    assert sum(n["max_workers"] for n in nodes.values()) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    # Our setup commands replaced the provider defaults (which install a Ray nightly wheel).
    assert not any("ray-wheels" in c for c in prepared["worker_setup_commands"])


def _typo_min_worker(c):
    c["available_node_types"]["gpu_worker"]["min_worker"] = 1


def _typo_top_level(c):
    c["max_worker"] = 3


def _fractional_gpu(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.default"


def _min_above_max(c):
    c["available_node_types"]["gpu_worker"].update(min_workers=5, max_workers=4)


def _sum_min_above_global_max(c):
    c["max_workers"] = 2
    c["available_node_types"]["gpu_worker"]["min_workers"] = 2
    c["available_node_types"]["cpu_worker"]["min_workers"] = 1


def _missing_resources(c):
    del c["available_node_types"]["cpu_worker"]["resources"]


def _bad_docker_key(c):
    c["docker"]["imgae"] = c["docker"]["image"]


BROKEN = {
    "min_worker typo": (_typo_min_worker, jsonschema.ValidationError, "min_worker"),
    "top-level typo": (_typo_top_level, jsonschema.ValidationError, "max_worker"),
    "fractional GPU": (_fractional_gpu, jsonschema.ValidationError, "0.5"),
    "head type not a node type": (_unknown_head_type, ValueError, "head_node_type"),
    "min_workers > max_workers": (_min_above_max, ValueError, "min_workers"),
    "sum(min_workers) > max_workers": (_sum_min_above_global_max, ValueError, "max_workers"),
    "node type without resources": (_missing_resources, jsonschema.ValidationError, "resources"),
    "docker key typo": (_bad_docker_key, jsonschema.ValidationError, "imgae"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copies_are_rejected(raw, case):
    mutate, error, message = BROKEN[case]
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error, match=re.escape(message)):
        validate_offline(broken)


def _repo_mount(raw) -> str:
    """The remote path the repository (local ".") is synced to."""
    mounts = [remote for remote, local in raw["file_mounts"].items() if local == REPO_MOUNT_SOURCE]
    assert len(mounts) == 1, f"cluster.yaml must sync the repo ('.') exactly once: {mounts}"
    return mounts[0].rstrip("/")


def test_every_node_installs_this_package_with_the_pinned_versions(raw, prepared):
    mount = _repo_mount(raw)
    expected = f"pip install --quiet -c {mount}/constraints.txt -e {mount}"
    # prepare_config merges setup_commands into both lists: head and workers get the same install.
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c and "-e " in c]
        assert installs == [expected], f"{key}: {prepared[key]}"
    # ... and the constraints pin the Ray this test runs (and the laptop submits with).
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["ray"] == ray.__version__
    assert "torch" in pins and "torchaudio" not in pins


def test_docker_image_matches_installed_ray_and_python(raw):
    images = [raw["docker"]["image"]]
    images += [raw["docker"][k] for k in ("head_image", "worker_image") if k in raw["docker"]]
    images += [
        n["docker"]["worker_image"]
        for n in raw["available_node_types"].values()
        if "worker_image" in n.get("docker", {})
    ]
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-(gpu|cpu|cu\d+)", image)
        assert match, f"unexpected image {image!r} (ray-ml images are gone in 2.60)"
        assert match.group(1) == ray.__version__, image
        assert match.group(2) == python, image


def test_token_auth_on_every_node(raw):
    mounts = raw["file_mounts"]
    token_mounts = [remote for remote in mounts if remote.endswith("/.ray/auth_token")]
    assert token_mounts and mounts[token_mounts[0]] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)


def test_rsync_leaves_out_environments_outputs_and_corpora(raw):
    excluded = set(raw["rsync_exclude"])
    assert {".venv", "/runs", "/data", "**/.git"} <= excluded
    assert {".gitignore", ".rayignore"} <= set(raw["rsync_filter"])


# --- what `ray job submit --working-dir .` uploads ----------------------------------------------


def _package_names(root: Path, tmp_path: Path, include_gitignore: bool) -> set[str]:
    """The file names Ray's job client would zip up for ``working_dir=root``."""
    target = tmp_path / f"pkg-{include_gitignore}.zip"
    create_package(str(root), target, include_gitignore=include_gitignore)
    with zipfile.ZipFile(target) as zf:
        return set(zf.namelist())


def test_rayignore_keeps_code_and_configs_and_drops_the_rest(tmp_path):
    tree = tmp_path / "repo"
    keep = [
        "after_ray/__init__.py",
        "after_ray/distributed/session.py",
        "configs/demo.yaml",
        "jobs/prepare.py",
        "tests/test_x.py",
        "constraints.txt",
        "setup.cfg",
        "pyproject.toml",
        "README.md",
        "cluster.yaml",
    ]
    drop = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        "runs/demo/manifest.parquet",
        "runs/demo/config.yaml",
        "data/synth/a.wav",
        "after_ray/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/constants/abc",
        "after_ray.egg-info/PKG-INFO",
        "notes/scores.parquet",
        "notes/clip.wav",
        "notes/model.safetensors",
    ]
    for name in keep + drop:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    (tree / ".rayignore").write_text((REPO / ".rayignore").read_text())
    # .rayignore alone must do the job: RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns .gitignore off.
    names = _package_names(tree, tmp_path, include_gitignore=False)
    assert set(keep) <= names
    assert not names & set(drop), sorted(names & set(drop))


def test_repository_upload_is_code_and_configs_only(tmp_path):
    names = _package_names(REPO, tmp_path, include_gitignore=False)
    for needed in ("after_ray/cli.py", "jobs/_entry.py", "jobs/prepare.py", "configs/demo.yaml"):
        assert needed in names
    top_dirs = {n.split("/", 1)[0] for n in names if "/" in n}
    assert not top_dirs & {".venv", ".git", "runs", "data", ".pytest_cache", ".ruff_cache"}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".parquet", ".wav"))]
    zipped = (tmp_path / "pkg-False.zip").stat().st_size
    assert zipped < 20 * 1024**2, f"working_dir upload is {zipped / 1024**2:.1f} MiB"
