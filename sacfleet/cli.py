"""Command line: `sacfleet train`, `eval`, `sweep`, `bench`, `scale` (a live run's actor count), `chaos` and `soak`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from sacfleet.bench import SUITES

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sacfleet", description="Distributed Soft Actor-Critic.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an agent")
    train.add_argument("--config", help="preset name (pointmass, pendulum, halfcheetah, ...) or a YAML file, "
                                        "optionally with +variant (hopper+fast: configs/variants/fast.yaml laid "
                                        "over it); default pointmass (with --resume: the run's own config.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set learner.batch_size=512 (repeatable)")
    train.add_argument("--run-dir", type=Path, help="output directory; default runs/<config>-<time>")
    train.add_argument("--inline", action="store_true",
                       help="run every component in lockstep in this process, without Ray (deterministic)")
    train.add_argument("--address", help="join an existing Ray cluster (auto or HOST:PORT); "
                                         "default: start an embedded Ray sized to this machine")
    train.add_argument("--resume", type=Path, metavar="DIR",
                       help="continue the run in DIR from its last checkpoint (--set may change keys, "
                            "e.g. raise train.total_env_steps)")
    train.add_argument("--placement-group", dest="reservation", metavar="ID:BUNDLE",
                       help="run the whole fleet in bundle BUNDLE of the existing placement group ID, planned "
                            "within what it holds (how `sacfleet sweep --fleet` gives each trial the resources Tune "
                            "reserved for it); needs --address")
    train.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray; default all of this machine's")
    train.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with the embedded Ray")
    train.add_argument("--reachable", action="store_true",
                       help="let the embedded Ray (and its dashboard) listen on this machine's network address, "
                            "as Ray does by default; without it every port is on 127.0.0.1 only")

    sweep = sub.add_parser("sweep", help="many runs on Ray Tune: each seed (x each grid point) a trial; the final "
                                         "evals' mean, median and IQM with 95%% intervals, a table and plots")
    sweep.add_argument("--config", default="pointmass", help="preset or YAML file, as for train (default pointmass)")
    sweep.add_argument("--seeds", default="0-9", help="seeds: 0-9, 0,3,5 or 0-4,7 (default 0-9)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a config key and the values to try, e.g. learner.actor_lr=0.001,0.0003 (repeatable: "
                            "every combination is a grid point)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key of every trial (repeatable)")
    sweep.add_argument("--fleet", action="store_true",
                       help="each trial a fleet (env actors, shards, learner) in a placement group Tune reserves; "
                            "default: each trial an in-process run (train --inline)")
    sweep.add_argument("--cpus-per-trial", type=float, help="CPUs Tune reserves per trial (default 1; with --fleet 2)")
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs Tune reserves per trial (default 0)")
    sweep.add_argument("--concurrent", type=int, metavar="N",
                       help="run at most N trials at once (default: as many as the cluster's free resources hold)")
    sweep.add_argument("--threshold", type=float,
                       help="also report the fraction of seeds whose final eval ends above this return")
    sweep.add_argument("--address", help="run the trials on an existing Ray cluster (auto or HOST:PORT); default: "
                                         "an embedded Ray sized to this machine. The run directory must be on a "
                                         "filesystem every node sees")
    sweep.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray; default all of this machine's")
    sweep.add_argument("--run-dir", type=Path, help="the sweep's directory; default runs/sweep-<config>-<time>; "
                                                    "an existing one is continued (its unfinished trials run)")
    sweep.add_argument("--retry-failed", action="store_true", help="run the trials that failed before again")

    bench = sub.add_parser("bench", help=f"throughput benchmarks: {', '.join(SUITES)}")
    bench.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all): {', '.join(SUITES)}")
    bench.add_argument("--json", action="store_true", help="print the records as JSON on stdout (progress on stderr)")
    bench.add_argument("--out", type=Path, help="directory for table.txt, records.json and plots; "
                                                "default runs/bench-<time>")
    bench.add_argument("--seconds", type=float, default=2.0, help="timing budget per measurement (default 2)")
    bench.add_argument("--batch-sizes", type=_int_list, default=None, metavar="B,B,...",
                       help="learner batch sizes (default 256,512,1024,2048,4096)")
    bench.add_argument("--devices", type=lambda s: s.split(","), default=None, metavar="cpu,cuda",
                       help="learner devices (default: cpu, and cuda when torch sees one)")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    bench.add_argument("--compile", dest="compile_mode", choices=("auto", "on", "off"), default="auto",
                       help="learner suite: learner.compile of the learners measured (default auto: on CUDA only)")
    bench.add_argument("--actors", type=_int_list, default=None, metavar="N,N,...",
                       help="actor counts of the actors and e2e suites (default 1,2,4,... up to the cores)")
    bench.add_argument("--env", dest="env_id", metavar="ENV_ID",
                       help="env of the env and actors suites (default: the env suite's list; HalfCheetah-v5 "
                            "for actors)")
    learning = bench.add_argument_group("the learning suite (`sacfleet bench learning`: training runs, hours; never "
                                        "part of the default suites)")
    learning.add_argument("--presets", type=lambda s: s.split(","), default=["hopper", "walker2d", "halfcheetah"],
                          metavar="P,P,...", help="presets to train (default hopper,walker2d,halfcheetah)")
    learning.add_argument("--variants", type=lambda s: s.split(","), default=["sac", "fast"], metavar="V,V,...",
                          help="sac (the preset as it is) or a variant of configs/variants; the first is the "
                               "baseline the others are compared with (default sac,fast)")
    learning.add_argument("--seeds", type=_seed_list, default=(0, 1), metavar="S,S,...", help="seeds (default 0,1)")
    learning.add_argument("--steps", type=int, default=100_000, help="env steps per run (default 100000)")
    learning.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key of every run, e.g. learner.critic_hidden_sizes=[2048,2048]")
    learning.add_argument("--inline", action="store_true", help="train in process, without Ray (deterministic)")

    chaos = sub.add_parser("chaos", help="a run during which a random fleet process is SIGKILLed (or SIGSTOPped, "
                                         "--hang) every N seconds; checks that it finishes and counts every failure")
    chaos.add_argument("--every", type=float, default=15.0, help="seconds between kills (default 15)")
    chaos.add_argument("--targets", type=lambda s: s.split(","),
                       default=["EnvActor", "ReplayShard", "LearnerService", "EvalActor"], metavar="CLASS,...",
                       help="Ray actor classes to kill (default all: EnvActor,ReplayShard,LearnerService,EvalActor)")
    chaos.add_argument("--seed", type=int, default=0, help="picks the victims (default 0)")
    chaos.add_argument("--hang", type=float, nargs="?", const=0.5, default=0.0, metavar="FRACTION",
                       help="stop this fraction of the victims with SIGSTOP instead of killing them, as a hung "
                            "process (a stuck syscall, a deadlock) would look; --hang alone: half (default 0)")
    soak = sub.add_parser("soak", help="a long run at full load sampling the memory of every process")
    soak.add_argument("--minutes", type=float, default=60.0, help="run length (default 60)")
    soak.add_argument("--warmup-minutes", type=float, default=10.0, help="growth is measured after this (default 10)")
    soak.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples (default 30)")
    for drill in (chaos, soak):
        drill.add_argument("--config", default="pointmass", help="preset or YAML file (default pointmass)")
        drill.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key of the run (repeatable)")
        drill.add_argument("--run-dir", type=Path, help="the run's directory; default runs/<drill>-<time>")
        drill.add_argument("--num-cpus", type=int, help="CPUs of the run's embedded Ray")

    scale = sub.add_parser("scale", help="change the number of env actors of a live fleet run")
    scale.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's directory (its --run-dir)")
    scale.add_argument("--actors", type=int, required=True, help="env actors the fleet should have")
    scale.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the driver's answer "
                                                                    "(default 180)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint with deterministic actions")
    ev.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file or run directory")
    ev.add_argument("--best", action="store_true", help="the run's best-evaluated policy (checkpoints/best.pt, "
                                                        "kept with checkpoint.best) instead of its last checkpoint")
    ev.add_argument("--episodes", type=int, default=20)
    ev.add_argument("--seed", type=int, help="evaluation seed; default the run's eval.seed")
    return parser


def _ints(minimum: int, what: str):
    """An argparse type: comma-separated integers, each at least `minimum`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


_int_list = _ints(1, "positive integers")
_seed_list = _ints(0, "seeds >= 0")


def _bench(args) -> int:
    # Imports only what the chosen suites need: the learner suite runs with torch and numpy alone.
    from sacfleet.bench import SUITES, suite_module
    from sacfleet.bench.report import format_table, to_json, write_outputs

    if "learning" in args.suites:
        return _bench_learning(args)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(f"sacfleet bench: unknown suite {unknown[0]!r}; choose from: {', '.join(SUITES)}, learning",
              file=sys.stderr)
        return EXIT_USAGE
    if args.seconds <= 0:
        print("sacfleet bench: --seconds must be > 0", file=sys.stderr)
        return EXIT_USAGE
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    log = sys.stderr if args.json else sys.stdout
    def echo(line: str) -> None:
        print(line, file=log, flush=True)

    options = {"seconds": args.seconds, "devices": args.devices, "echo": echo, "compile_mode": args.compile_mode}
    if args.batch_sizes:
        options["batch_sizes"] = args.batch_sizes
    if args.actors:
        options["actors"] = args.actors
    if args.env_id:
        options["env_id"] = args.env_id
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
              f"{os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    echo(f"sacfleet bench: {header}")
    records = []
    for name in args.suites or SUITES:
        try:
            records += suite_module(name).run(**options)
        except (RuntimeError, ValueError) as exc:
            print(f"sacfleet bench {name}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    # Printed before anything is written: the figures of a long run are not lost to a failing plot.
    print(to_json(records) if args.json else format_table(records), flush=True)
    out_dir = args.out or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    written = write_outputs(records, out_dir, header)
    echo(f"wrote {', '.join(str(p) for p in written)}"
         + ("" if any(p.suffix == ".png" for p in written) else " (no plots: matplotlib is not installed)"))
    return 0


def _bench_learning(args) -> int:
    from sacfleet.bench import learning
    from sacfleet.common.config import ConfigError

    if args.suites != ["learning"]:
        return _usage("learning trains for hours: run it on its own, not with other suites", "bench")
    if args.steps < 1:
        return _usage("learning: --steps must be >= 1", "bench")
    out = args.out or Path("runs") / f"bench-learning-{time.strftime('%Y%m%d-%H%M%S')}"
    log = sys.stderr if args.json else sys.stdout
    try:
        records = learning.run(args.presets, args.variants, args.seeds, args.steps, out, args.overrides,
                               inline=args.inline, echo=lambda line: print(line, file=log, flush=True))
    except ConfigError as exc:
        print(f"sacfleet bench learning: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        from sacfleet.bench.report import to_json

        print(to_json(records), flush=True)
    else:
        print((out / "table.md").read_text(), flush=True)
    print(f"wrote {out / 'table.md'}, {out / 'records.json'}"
          + (f", {out / 'curves.png'}" if (out / "curves.png").is_file() else ""), file=log, flush=True)
    return 0


def _train(args) -> int:
    from sacfleet.common.config import load_config
    from sacfleet.driver.train_inline import train_inline

    if args.resume is not None:
        if args.inline:
            return _usage("--resume continues a fleet run; it cannot be combined with --inline")
        if args.config is not None:
            return _usage("--resume uses the run's own config.yaml; change keys with --set instead of --config")
        if args.run_dir is not None and args.run_dir.resolve() != args.resume.resolve():
            return _usage("--resume writes into the resumed run's directory; drop --run-dir")
        config_path = args.resume / "config.yaml"
        if not config_path.is_file():
            return _usage(f"--resume {args.resume}: no config.yaml there; is it a sacfleet run directory?")
        cfg = load_config(str(config_path), args.overrides)
        run_dir = args.resume
    else:
        cfg = load_config(args.config or "pointmass", args.overrides)
        name = Path(args.config or "pointmass").stem
        run_dir = args.run_dir or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from sacfleet.driver.errors import RunFailed

    try:
        if args.inline:
            if args.address or args.reachable:
                return _usage("--inline runs without Ray; it cannot be combined with --address or --reachable")
            signal.signal(signal.SIGTERM, _terminate_gracefully)
            train_inline(cfg, run_dir)
            return 0
        reservation = None
        if args.reservation:
            from sacfleet.driver.placement import Reservation

            if not args.address:
                return _usage("--placement-group names a placement group of a running Ray cluster; give its --address")
            try:
                reservation = Reservation.parse(args.reservation)
            except ValueError as exc:
                return _usage(f"--placement-group: {exc}")
        if args.address:
            if args.reachable:
                return _usage("--reachable is for the embedded Ray; a cluster joined with --address keeps its own "
                              "addresses")
            _prefer_token_auth()
        from sacfleet.driver.train_fleet import train_fleet

        signal.signal(signal.SIGTERM, _terminate_gracefully)
        train_fleet(cfg, run_dir, address=args.address, resume=args.resume is not None,
                    num_cpus=args.num_cpus, dashboard=args.dashboard, reachable=args.reachable,
                    reservation=reservation)
    except RunFailed as exc:
        print(f"sacfleet train: the run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _prefer_token_auth() -> None:
    """Current Ray clusters use token authentication, but a driver joining one sends its token
    only in token mode, which Ray reads when it is imported: choose it when this machine has a
    token and the user has not set RAY_AUTH_MODE (set RAY_AUTH_MODE=disabled to join a cluster
    without authentication)."""
    has_token = ((Path.home() / ".ray" / "auth_token").is_file() or "RAY_AUTH_TOKEN" in os.environ
                 or "RAY_AUTH_TOKEN_PATH" in os.environ)
    if has_token and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def _terminate_gracefully(signum, frame) -> None:
    # A scheduler's SIGTERM stops a run as Ctrl-C does: final checkpoint and summary, exit 0.
    raise KeyboardInterrupt


def _usage(message: str, command: str = "train") -> int:
    print(f"sacfleet {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _eval(args) -> int:
    from sacfleet.driver.eval_checkpoint import evaluate_checkpoint

    if args.episodes < 1:
        return _usage("--episodes must be >= 1", "eval")
    print(evaluate_checkpoint(args.checkpoint, args.episodes, args.seed, best=args.best))
    return 0


def _scale(args) -> int:
    from sacfleet.driver.scaling import ScaleRefused, request_scale

    try:
        reply = request_scale(args.run_dir, args.actors, args.timeout)
    except ScaleRefused as exc:
        print(f"sacfleet scale: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sacfleet scale: {reply['message']}", flush=True)
    return 0


def _drill(args) -> int:
    from sacfleet.drills.chaos import TARGETS, chaos
    from sacfleet.drills.soak import soak

    run_dir = args.run_dir or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists():
        return _usage(f"--run-dir {run_dir} exists; choose a new one", args.command)
    train_args = ["--config", args.config, *[f"--set={o}" for o in args.overrides]]
    if args.num_cpus:
        train_args += ["--num-cpus", str(args.num_cpus)]
    echo = lambda line: print(line, flush=True)  # noqa: E731
    if args.command == "chaos":
        unknown = sorted(set(args.targets) - set(TARGETS))
        if unknown:
            return _usage(f"--targets: unknown {unknown}; choose from {', '.join(TARGETS)}", "chaos")
        if not 0.0 <= args.hang <= 1.0:
            return _usage(f"--hang: a fraction from 0 to 1, not {args.hang:g}", "chaos")
        report = chaos(train_args, run_dir, args.every, args.targets, args.seed, echo, args.hang)
        print(f"chaos: {len(report['kills'])} processes killed or stopped every {args.every:g}s; run "
              f"{'finished' if report['finished'] else 'FAILED (exit ' + str(report['exit_code']) + ')'}"
              + (f"; killed {report['killed']}, counted {report['counted']}; stopped {report['stopped']}, counted "
                 f"hung {report['counted_hung']}; left behind {len(report['left_behind'])} "
                 f"({'exact' if report['exact'] else 'MISMATCH'});"
                 f" eval return {report['eval_return']:.1f}; lost {report['lost_transitions']:,} transitions, "
                 f"{report['lost_updates']:,} updates" if "killed" in report else "")
              + f"; report {run_dir / 'chaos.json'}", flush=True)
        return 0 if report["finished"] and report.get("exact") else EXIT_FAILED
    report = soak(train_args, run_dir, args.minutes, args.warmup_minutes, args.sample_every, echo)
    for row in report["processes"]:
        print(f"  {row['process']:<24} pid {row['pid']:>7}  {row['rss_at_warmup_mb']:8.1f} MB at warm-up, "
              f"max {row['rss_max_after_mb']:8.1f} MB after ({100 * row['growth']:+.1f}%)")
    print(f"soak: {args.minutes:g} min, exit {report['exit_code']}; largest growth after warm-up "
          f"{100 * (report['max_growth'] or 0):+.1f}%; report {run_dir / 'soak.json'}", flush=True)
    return 0 if report["exit_code"] == 0 and report["within_5_percent"] else EXIT_FAILED


def _sweep(args) -> int:
    import importlib

    if args.address:
        _prefer_token_auth()  # before anything imports Ray
    try:
        for module in ("ray.tune", "rliable.library"):
            importlib.import_module(module)
    except ImportError as exc:
        return _usage(f"needs Ray Tune and rliable, the `sweep` extra: pip install 'sacfleet[sweep]' ({exc})", "sweep")
    from sacfleet.common.config import ConfigError
    from sacfleet.sweep.run import sweep
    from sacfleet.sweep.spec import SweepRefused, SweepSpec, parse_grid, parse_seeds

    try:
        cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (2.0 if args.fleet else 1.0)
        if cpus <= 0 or args.gpus_per_trial < 0:
            raise SweepRefused("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        if args.fleet and cpus < 0.5:
            raise SweepRefused(f"--cpus-per-trial {cpus:g}: a fleet trial needs at least 0.5 CPU")
        if args.concurrent is not None and args.concurrent < 1:
            raise SweepRefused("--concurrent must be >= 1")
        grid = [parse_grid(g) for g in args.grid]
        keys = [k for k, _ in grid]
        if len(set(keys)) != len(keys):
            raise SweepRefused(f"--grid: a key given twice ({', '.join(sorted({k for k in keys if keys.count(k) > 1}))})")
        if "train.seed" in keys or any(o.split("=")[0].strip() == "train.seed" for o in args.overrides):
            raise SweepRefused("train.seed is what --seeds sets; give the seeds there")
        spec = SweepSpec(args.config, parse_seeds(args.seeds), grid, tuple(args.overrides), args.fleet, cpus,
                         args.gpus_per_trial)
        run_dir = args.run_dir or Path("runs") / f"sweep-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        report = sweep(spec, run_dir, address=args.address, concurrent=args.concurrent, threshold=args.threshold,
                       num_cpus=args.num_cpus, retry_failed=args.retry_failed,
                       echo=lambda line: print(line, flush=True))
    except (SweepRefused, ConfigError) as exc:
        print(f"sacfleet sweep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if report["complete"] else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "bench":
        return _bench(args)
    if args.command in ("chaos", "soak"):
        return _drill(args)
    if args.command == "scale":
        return _scale(args)
    from sacfleet.common.config import ConfigError
    from sacfleet.driver.errors import RunRefused

    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (ConfigError, RunRefused) as exc:
        print(f"sacfleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
