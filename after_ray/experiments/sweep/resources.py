"""How much of the cluster a sweep's trials take: each trial's own reservation
(:func:`trial_resources`), its peak with the Ray Data / Train work it starts (:func:`trial_peak`),
how many trials run at once without the Tune + Data/Train deadlock
(:func:`default_max_concurrent`), and whether trials train in their own process
(:func:`resolve_local_training`).
"""

from __future__ import annotations

from after_ray.config.sections import Config
from after_ray.experiments.sweep.plan import SweepSpec, TrialPlan


def _single_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


def resolve_local_training(base: Config, spec: SweepSpec) -> bool:
    if spec.local_training is not None:
        return spec.local_training
    return not base.ray.use_gpu and _single_node()


def trial_cpus(spec: SweepSpec, config: Config) -> float:
    if spec.trial_cpus is not None:
        return float(spec.trial_cpus)
    return float(config.ray.cpus_per_worker) if config.ray.num_workers == 0 else 1.0


def trial_peak(spec: SweepSpec, config: Config) -> tuple[float, float]:
    """(CPUs, GPUs) a trial holds at its peak, its own reservation included.

    Beyond its own process a trial needs, one stage at a time (they never overlap):

    * training: its Ray Train workers (``num_workers x cpus/gpus_per_worker``; none in local
      mode, where the loop runs in the trial process) plus one CPU for the Ray Data decode tasks
      that feed them;
    * scoring: its scoring actors (one CPU, and one GPU with ``use_gpu``, per actor; see
      ``scoring.score_rows``). Ray Data fuses the audio decoding into the actors
      (``ActorPoolMapOperator[MapBatches(decode_batch)->MapBatches(ScoringActor)]``), so
      scoring needs no decode tasks beside them.

    If every running trial has its peak available, none can wait for another: that is the
    invariant :func:`default_max_concurrent` keeps.
    """
    ray_cfg = config.ray
    train_cpus = ray_cfg.num_workers * ray_cfg.cpus_per_worker + 1
    train_gpus = ray_cfg.num_workers * ray_cfg.gpus_per_worker if ray_cfg.use_gpu else 0.0
    score_cpus = float(ray_cfg.scoring_actors)
    score_gpus = float(ray_cfg.scoring_actors) if ray_cfg.use_gpu else 0.0
    cpus = trial_cpus(spec, config) + max(train_cpus, score_cpus)
    gpus = float(spec.trial_gpus) + max(train_gpus, score_gpus)
    return cpus, gpus


def default_max_concurrent(
    plans: list[TrialPlan], spec: SweepSpec, cluster: dict[str, float]
) -> int:
    """How many trials the cluster holds at once without the Tune + Data/Train deadlock.

    ``cluster CPUs // peak CPUs per trial``, and with GPUs also ``cluster GPUs // peak GPUs per
    trial`` (:func:`trial_peak`); at least 1 and at most the number of trials. Tune reserves only
    the trial's own ``trial_cpus``; the rest of its peak is left unreserved on purpose, for the
    actors, workers and tasks the trial starts, which Ray schedules outside the trial's own
    reservation. With the defaults (local training, one scoring actor, one CPU per trial) a trial
    peaks at 2 CPUs: 4 CPUs run 2 trials at once.
    """
    peaks = [trial_peak(spec, plan.config) for plan in plans]
    peak_cpus = max(p[0] for p in peaks)
    peak_gpus = max(p[1] for p in peaks)
    limit = int(cluster.get("CPU", 1.0) // peak_cpus)
    if peak_gpus > 0:
        limit = min(limit, int(cluster.get("GPU", 0.0) // peak_gpus))
    return max(1, min(limit, len(plans)))


def trial_resources(plans: list[TrialPlan], spec: SweepSpec) -> dict[str, float]:
    """What Tune reserves for each trial's own process: the most CPUs any trial needs."""
    cpus = max(trial_cpus(spec, p.config) for p in plans)
    return {"cpu": cpus, "gpu": float(spec.trial_gpus)}
