"""`after-ray sweep`: a grid of AL runs as Ray Tune trials (the whole story: :mod:`.driver`).

* :mod:`.plan`: ``SweepSpec``, axis parsing and checks, ``plan_trials`` (trial names, run
  directories, configs), ``sweep_spec_from_cli``, ``default_sweep_name``; no Ray needed;
* :mod:`.resources`: what a trial reserves and peaks at, ``default_max_concurrent``, local
  training;
* :mod:`.trial`: ``SweepTrial``, the Tune trainable (one iteration per AL round, checkpoints);
* :mod:`.driver`: ``run_sweep`` and ``SweepResult``: shared stages, the Tuner, failed trials and
  the report.
"""
