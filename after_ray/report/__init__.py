"""Reports of AL runs: learning curves, seed bands, AULC, confusion matrices, selection class
balance and stage times, as ``report.md`` (+ PNGs) for people and ``report.json`` for machines.

One module per step, each building on the one before:

* :mod:`~after_ray.report.load`: a run directory -> ``RunSummary`` (what is read, error policy);
* :mod:`~after_ray.report.aggregate`: runs -> seed groups -> ``Report`` (the definitions: seed
  groups, standard deviation, AULC);
* :mod:`~after_ray.report.figures`: a ``Report`` -> the PNGs;
* :mod:`~after_ray.report.render`: a ``Report`` -> ``report.md`` and ``report.json``, and
  ``write_report``, which does it all.
"""
