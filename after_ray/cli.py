"""`after-ray` command line: one thin command per stage, each a call into the library.

Every command takes ``--config FILE`` plus dotted overrides (``al.budget.max_total=0.2``).
Errors meant for the user (bad config, missing corpus, invalid label file) print one clear message
and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from after_ray.errors import AfterRayError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _load(args: argparse.Namespace):
    from after_ray.config.sections import load_config

    path = args.config
    if path is None and getattr(args, "default_demo", False) and DEMO_CONFIG.is_file():
        path = DEMO_CONFIG
    return load_config(path, args.overrides)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_config(args: argparse.Namespace) -> int:
    """Print the fully resolved configuration (defaults + file + recipe + overrides) as YAML."""
    from dataclasses import asdict

    from after_ray.config.recipes import choose_recipe

    config = _load(args)
    print(f"# training recipe: {choose_recipe(asdict(config.backbone)).reason}")
    print(config.to_yaml(), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from after_ray.pipeline.prepare import prepare

    config = _load(args)
    result = prepare(config)
    print(f"manifest: {result.n_rows} utterances -> {result.manifest_path}")
    _print_json(result.description)
    print(result.summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from after_ray.experiments.demo import run_demo

    run_demo(_load(args))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from after_ray.pipeline.runner import run_active_learning

    outcome = run_active_learning(_load(args))
    if outcome.waiting_for_labels is not None:
        print(f"waiting for labels of round {outcome.waiting_for_labels} (see above)")
    else:
        print(f"run finished: {outcome.run_dir}")
    return 0


def cmd_tapt(args: argparse.Namespace) -> int:
    from after_ray.pipeline.runner import run_tapt_only

    print(f"TAPT backbone: {run_tapt_only(_load(args))}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from after_ray.pipeline.runner import run_full_data

    outcome = run_full_data(_load(args))
    print(f"full-data fine-tune finished: {outcome.run_dir}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from after_ray.pipeline.runner import score_with_model

    path = score_with_model(_load(args), args.model, split=args.split)
    print(f"scores: {path}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from after_ray.pipeline.human import export_pending, import_answers

    if args.action == "export":
        for path in export_pending(Path(args.run_dir), round_index=args.round):
            print(path)
        return 0
    if not args.file:
        raise AfterRayError(
            "label import needs the answers file: after-ray label import RUN_DIR FILE"
        )
    written = import_answers(Path(args.run_dir), Path(args.file), round_index=args.round)
    print(f"imported {len(written)} labels into {args.run_dir}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from after_ray.store.check import check_run_dir

    problems = check_run_dir(Path(args.run_dir))
    if not problems:
        print(f"{args.run_dir}: consistent")
        return 0
    for problem in problems:
        print(f"- {problem}")
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from after_ray.report.load import discover_run_dirs
    from after_ray.report.render import write_report

    run_dirs = discover_run_dirs([Path(d) for d in args.run_dirs])
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "report"
    path = write_report(
        run_dirs, out, title=args.title, reference_dirs=[Path(d) for d in args.reference]
    )
    print(f"report: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A Ray Tune grid of AL runs (strategies x seeds x any config key), then its report."""
    from after_ray.experiments.sweep.driver import run_sweep
    from after_ray.experiments.sweep.plan import default_sweep_name, sweep_spec_from_cli

    config = _load(args)
    spec = sweep_spec_from_cli(
        args.spec,
        args.axis,
        max_concurrent_trials=args.max_concurrent_trials,
        trial_cpus=args.trial_cpus,
        trial_gpus=args.trial_gpus,
    )
    result = run_sweep(
        config,
        spec,
        name=args.name or default_sweep_name(spec),
        storage_path=args.storage_path,
        resume=not args.no_resume,
    )
    print("\n".join(result.summary_lines()))
    return 1 if result.n_errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from after_ray.pipeline.runner import export_round_model

    path = export_round_model(Path(args.run_dir), args.out, round_index=args.round)
    print(f"Hugging Face audio-classification model: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "audio":
        from after_ray.bench.audio import run_audio_benchmark

        run_audio_benchmark(n_files=_or(args.n_files, 200), seconds=_seconds(args, 3.0))
        return 0
    if args.what == "ingest":
        from after_ray.bench.ingest import run_ingest_benchmark

        try:
            run_ingest_benchmark(
                n_files=_or(args.n_files, 128),
                seconds=_seconds(args, 5.0),
                batch_size=_or(args.batch_size, 8),
                seed=args.seed,
                repeats=args.repeats,
                ways=tuple(w.strip() for w in args.ways.split(",") if w.strip()),
                out_dir=args.out_dir,
            )
        except ValueError as exc:  # unknown ways, files no longer than the crop
            raise AfterRayError(f"bench ingest: {exc}") from None
        return 0
    if args.what == "select":
        from after_ray.bench.select import run_select_benchmark

        run_select_benchmark(
            n=_or(args.n, 1_000_000),
            d=_or(args.d, 768),
            k=_or(args.k, 10_000),
            strategy=args.strategy,
            shards=args.shards,
            data=args.data,
            naive_picks=args.naive_picks,
        )
        return 0
    if args.what == "load":
        from after_ray.bench.load import run_load_benchmark

        try:
            run_load_benchmark(
                n=_or(args.n, 200_000),
                d=_or(args.d, 128),
                k=_or(args.k, 2000),
                n_classes=args.n_classes,
                rounds=args.rounds,
                out_dir=args.out_dir,
                seed=args.seed,
            )
        except ValueError as exc:  # sizes that cannot work (k * rounds > n, ...)
            raise AfterRayError(f"bench load: {exc}") from None
        return 0
    if args.what == "finetune":
        from after_ray.bench.finetune import run_finetune_benchmark

        presets = tuple((args.backbones or "tiny,base").split(","))
        run_finetune_benchmark(_load(args), utterances=args.utterances, presets=presets)
        return 0
    if args.what == "backbone":
        from after_ray.bench.backbone import run_backbone_benchmark

        try:
            run_backbone_benchmark(
                args.config,
                args.overrides or [],
                presets=tuple((args.backbones or "tiny,base,base-hubert").split(",")),
                batch_size=_or(args.batch_size, 2),
                seconds=_seconds(args, 2.0),
                steps=_or(args.steps, 3),
                threads=args.threads,
            )
        except (ValueError, RuntimeError) as exc:
            raise AfterRayError(str(exc)) from None
        return 0
    if args.what == "gpu":
        from after_ray.bench.gpu import run_gpu_check

        try:
            return run_gpu_check(
                args.config,
                args.overrides or [],
                quick=args.quick,
                precision=args.precision,
                batch_size=_or(args.batch_size, 8),
                seconds=_seconds(args, 4.0),
                steps=args.steps,
            )
        except ValueError as exc:
            raise AfterRayError(f"bench gpu: {exc}") from None
    if args.what == "al":
        from after_ray.bench.al import run_al_benchmark

        run_al_benchmark(
            _load(args),
            arms=[a.strip() for a in args.arms.split(",") if a.strip()],
            seeds=list(range(args.n_seeds)),
            name=args.name,
            max_concurrent_trials=args.max_concurrent_trials,
        )
        return 0
    raise AfterRayError(f"unknown benchmark {args.what!r}")


def _or(value: int | None, default: int) -> int:
    """A bench size option: the option's value, else this benchmark's own default."""
    return default if value is None else value


def _seconds(args: argparse.Namespace, default: float) -> float:
    """``--seconds``: the option's value, else this benchmark's own default."""
    return default if args.seconds is None else args.seconds


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the file, e.g. al.budget.max_total=0.2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="after-ray",
        description="Active learning with task-adaptive pre-training for speech emotion "
        "recognition, on Ray.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `after-ray --help` lists the commands in the order they are added here.
    _add_stage_commands(sub)
    _add_run_dir_commands(sub)
    _add_sweep_command(sub)

    p = _add_command(
        sub, "export", cmd_export, "export a round's model as a Hugging Face directory"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--round", type=int, default=None, help="default: the last trained round")

    p = _add_command(sub, "config", cmd_config, "print the resolved configuration")
    _add_config_args(p)

    _add_bench_command(sub)
    return parser


def _add_command(
    sub: argparse._SubParsersAction, name: str, func: Callable, help_text: str
) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments carry ``func``, the ``cmd_*`` that runs it."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    return p


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """The pipeline stages: each runs on a configuration (``--config`` + overrides)."""
    p = _add_command(sub, "demo", cmd_demo, "build the demo corpus and run the pipeline on it")
    _add_config_args(p)
    p.set_defaults(default_demo=True)

    p = _add_command(sub, "prepare", cmd_prepare, "corpus -> checked manifest + quarantine table")
    _add_config_args(p)

    p = _add_command(sub, "run", cmd_run, "run (or resume) the AFTER active-learning loop")
    _add_config_args(p)

    p = _add_command(
        sub, "tapt", cmd_tapt, "task-adaptive pre-training of the backbone on the pool"
    )
    _add_config_args(p)

    p = _add_command(
        sub, "finetune", cmd_finetune, "fine-tune on the whole labeled pool (the reference)"
    )
    _add_config_args(p)

    p = _add_command(sub, "score", cmd_score, "score a split with a classifier checkpoint (cached)")
    p.add_argument("--model", required=True, help="a classifier directory (rounds/round_NNN/model)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    _add_config_args(p)


def _add_run_dir_commands(sub: argparse._SubParsersAction) -> None:
    """The commands on existing run directories: label, check, report."""
    p = _add_command(
        sub, "label", cmd_label, "human oracle: export a round's batch, import the answers"
    )
    p.add_argument("action", choices=["export", "import"])
    p.add_argument("run_dir")
    p.add_argument("file", nargs="?", help="import: the filled CSV or a Label Studio JSON export")
    p.add_argument("--round", type=int, default=None, help="default: the round waiting for labels")

    p = _add_command(
        sub, "check", cmd_check, "check a run directory's consistency (exit 1 on problems)"
    )
    p.add_argument("run_dir")

    p = _add_command(
        sub, "report", cmd_report, "Markdown report with learning curves for run directories"
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--reference", nargs="*", default=[], help="full-data run dirs (reference line)")
    p.add_argument("--out", help="output directory (default: <parent>/report)")
    p.add_argument("--title", help="report title")


def _add_sweep_command(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "sweep", cmd_sweep, "a Ray Tune grid of AL runs (e.g. strategies x seeds) + report"
    )
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept config key and its values, e.g. --axis al.strategy=after,random "
        "--axis run.seed=0,1,2 (repeatable; the grid is every combination)",
    )
    p.add_argument(
        "--spec",
        help="sweep YAML: axes: {KEY: [values]}, and optionally max_concurrent_trials, "
        "trial_cpus, trial_gpus, local_training (--axis adds to / replaces its axes)",
    )
    p.add_argument(
        "--name", help="sweep name; runs go to <run.output_dir>/<name>/ (default: sweep-<axes>)"
    )
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="default: what the cluster holds without the Tune + Data/Train deadlock",
    )
    p.add_argument("--trial-cpus", type=float, default=None, help="CPUs reserved per trial")
    p.add_argument("--trial-gpus", type=float, default=None, help="GPUs reserved per trial")
    p.add_argument(
        "--storage-path",
        help="Ray Tune storage (default <run.output_dir>/<name>/tune; shared storage such as "
        "s3://... on a multi-node cluster)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to continue an existing sweep of this name (default: continue it)",
    )
    _add_config_args(p)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    """``bench``: one parser for every benchmark; each option's help names the ones it is for."""
    p = _add_command(
        sub, "bench", cmd_bench, "benchmarks: our code against a baseline in the same run"
    )
    p.add_argument(
        "what",
        choices=["al", "audio", "ingest", "select", "load", "finetune", "backbone", "gpu"],
    )
    p.add_argument(
        "--arms",
        default="after,random,entropy,coreset",
        help="al: strategies compared (must include random; the config's own strategy keeps its "
        "cold start, the others start from random labels)",
    )
    p.add_argument("--n-seeds", type=int, default=5, help="al: seeds 0..N-1, paired across arms")
    p.add_argument("--name", help="al: sweep name (default bench-al-<run.name>)")
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="al: default: what the cluster holds without the Tune + Data/Train deadlock",
    )
    p.add_argument(
        "--n-files",
        type=int,
        default=None,
        help="audio, ingest: total files, alternating over the rates (200; ingest 128)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="audio, ingest: seconds per file (3; ingest 5, above the 4 s crop); backbone, gpu: "
        "seconds per utterance (2; gpu: 4)",
    )
    # Sizes default per benchmark (None here, resolved in cmd_bench).
    p.add_argument(
        "--n", type=int, default=None, help="select, load: pool size (1,000,000; load 200,000)"
    )
    p.add_argument(
        "--d", type=int, default=None, help="select, load: embedding dimension (768; load 128)"
    )
    p.add_argument(
        "--k", type=int, default=None, help="select, load: picks (10,000; load 2,000 per round)"
    )
    p.add_argument("--rounds", type=int, default=2, help="load: selection rounds per strategy")
    p.add_argument("--n-classes", type=int, default=4, help="load: classes")
    p.add_argument(
        "--out-dir",
        help="load: keep the shards and run directories here; ingest: the run directory "
        "(default runs/bench-ingest)",
    )
    p.add_argument("--seed", type=int, default=0, help="load, ingest: data seed")
    p.add_argument(
        "--ways",
        default="ours,ray,ray_ordered,ray_per_epoch",
        help="ingest: ways of feeding the Train workers, comma-separated",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="ingest: runs of each way with the same seed, compared with the first (>= 2)",
    )
    p.add_argument("--strategy", default="coreset", choices=["coreset", "badge", "cluster-margin"])
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--data", default="random", choices=["random", "clustered"])
    p.add_argument("--naive-picks", type=int, default=20)
    p.add_argument("--utterances", type=int, default=96, help="finetune: utterances per epoch")
    p.add_argument(
        "--backbones",
        default=None,
        help="finetune, backbone: presets, comma-separated (tiny,base; backbone: "
        "tiny,base,base-hubert)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="backbone, gpu, ingest: utterances per step (2; gpu, ingest: 8)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="backbone, gpu: timed steps per phase, after 1 warm-up (3; gpu --quick: 1)",
    )
    p.add_argument(
        "--quick", action="store_true", help="gpu: wav2vec2-base only, 1 timed step per stage"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="gpu: fine-tuning and scoring precision (auto = bf16 on CUDA; TAPT uses bf16 "
        "for fp16)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="backbone: torch threads (default: ray.cpus_per_worker)",
    )
    _add_config_args(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds KEY=VALUE overrides only before the options of a command with another
    # positional (``bench al KEY=VALUE --arms ...``); overrides after them are still overrides.
    strays = [a for a in extra if a.startswith("-") or "=" not in a]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # FAISS logs each CPU-feature library it tries (and fails) to load, at INFO.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from after_ray.distributed.session import quiet_environment

    quiet_environment()
    try:
        return int(args.func(args) or 0)
    except AfterRayError as exc:
        print(f"after-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("after-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
