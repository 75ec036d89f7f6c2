"""`sacfleet sweep`: every trial of a sweep (grid point x seed) run as a Ray Tune trial on the embedded
Ray or a cluster, queued to fit its resources; then the statistics, tables and plots over what the
trials' run directories hold. A rerun of the same sweep directory runs only the trials not done.

Ctrl-C or SIGTERM stops the sweep in order: no trial starts, each running trial's run is stopped as
Ctrl-C stops `sacfleet train` (checkpoint, summary), and the sweep waits for them; a second Ctrl-C
stops at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from sacfleet.driver.fleet import connect
from sacfleet.sweep.progress import SweepProgress
from sacfleet.sweep.spec import SweepRefused, SweepSpec, Trial, open_sweep_dir, trial_dir
from sacfleet.sweep.stats import TrialResult, aggregate, markdown, trial_rows, write_report
from sacfleet.sweep.trial import FAILED, FINISHED, SweepControl, TrialFiles, run_trial

DRIVER_CPUS = 0.1  # a fleet trial's first bundle: the trial's Tune actor and the fleet's driver process


class StopStarting(FIFOScheduler):
    """Tune's first-in first-out order, which starts nothing once the sweep is stopping."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def choose_trial_to_run(self, tune_controller):
        return None if self.stop.is_set() else super().choose_trial_to_run(tune_controller)

    def __getstate__(self):
        return {}  # Tune pickles it with its experiment state, which a sweep never restores from


class StopWhenDrained(tune.Stopper):
    """Tells the trials to stop once the sweep is stopping; ends the experiment once none runs."""

    def __init__(self, stop: threading.Event, control, progress: SweepProgress):
        self.stop, self.control, self.progress, self.told = stop, control, progress, False

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        if self.stop.is_set() and not self.told:
            self.control.stop.remote()
            self.told = True
        return self.stop.is_set() and self.progress.live == 0

    def __getstate__(self):
        return {}  # as StopStarting's


def results_of(sweep_dir: Path, trials: list[Trial]) -> list[TrialResult]:
    """Each trial as its directory holds it: finished, failed, or unfinished (no outcome yet)."""
    out = []
    for trial in trials:
        outcome = TrialFiles(trial_dir(sweep_dir, trial)).read_outcome() or {}
        status = outcome.get("status") if outcome.get("status") in (FINISHED, FAILED) else "unfinished"
        out.append(TrialResult(trial.point, trial.seed, status, outcome))
    return out


def trial_resources(spec: SweepSpec):
    """What Tune reserves for one trial: an in-process run's CPUs (and GPUs); for a fleet, a placement
    group of two bundles, the driver's and the whole fleet's, so that the fleet is planned within and
    runs in what Tune reserved."""
    if not spec.fleet:
        return {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    fleet = {"CPU": round(spec.cpus_per_trial - DRIVER_CPUS, 4), **({"GPU": spec.gpus_per_trial}
                                                                    if spec.gpus_per_trial else {})}
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}, fleet], strategy="PACK")


def sweep(spec: SweepSpec, sweep_dir: Path, *, address: str | None = None, concurrent: int | None = None,
          threshold: float | None = None, num_cpus: int | None = None, retry_failed: bool = False,
          echo: Callable[[str], None] = print, out: TextIO | None = None) -> dict:
    """Run the sweep's trials not done yet, then write sweep.json, sweep.md, curves.png and compare.png
    under `sweep_dir`; returns the report. Raises ConfigError / SweepRefused on bad input, before any
    trial starts (and, but for trials that fit no node, before anything in `sweep_dir` changes)."""
    out = out or sys.stdout
    sweep_dir = Path(sweep_dir)
    refused = spec.check()
    resumed = open_sweep_dir(sweep_dir, spec)
    trials = spec.trials()
    if retry_failed:
        for r in results_of(sweep_dir, trials):
            if r.status == FAILED:
                TrialFiles(trial_dir(sweep_dir, Trial(r.point, (), r.seed))).outcome.unlink()
    before = results_of(sweep_dir, trials)
    pending = [t for t, r in zip(trials, before) if r.status == "unfinished"]
    points = spec.points()
    echo(f"sweep: {spec.config}, {len(points)} grid point{'s' * (len(points) > 1)} x {len(spec.seeds)} seeds = "
         f"{len(trials)} trials ({'fleets' if spec.fleet else 'in-process runs'} of {spec.cpus_per_trial:g} CPU"
         f"{', %g GPU' % spec.gpus_per_trial if spec.gpus_per_trial else ''} each) in {sweep_dir}"
         + (f"; resuming: {len(trials) - len(pending)} done before, {len(pending)} to run" if resumed else ""))
    for point, reason in refused.items():
        echo(f"grid point {point}: refused ({reason}); its trials will fail")
    start = time.monotonic()
    stopped = False
    if pending:
        stopped = _run_on_tune(spec, sweep_dir, pending, address, concurrent, num_cpus, echo, out)
    results = results_of(sweep_dir, trials)
    report = {"config": spec.config, "seeds": list(spec.seeds), "grid": [[k, list(v)] for k, v in spec.grid],
              "overrides": list(spec.overrides), "mode": "fleet" if spec.fleet else "inline",
              "threshold": threshold, "sweep_dir": str(sweep_dir), "session_wall_seconds": round(time.monotonic() - start, 1),
              "complete": all(r.status == FINISHED for r in results), "stopped": stopped,
              "trials": trial_rows(results), **aggregate(results, points, threshold)}
    written = write_report(report, sweep_dir)
    written += _plots(report, spec, sweep_dir, echo)
    print(markdown(report), file=out, flush=True)
    unfinished = sum(r.status == "unfinished" for r in results)
    failed = sum(r.status == FAILED for r in results)
    echo(f"sweep: {len(results) - unfinished - failed} of {len(results)} trials finished, {failed} failed, "
         f"{unfinished} unfinished{' (rerun the same command to continue them)' if unfinished else ''} "
         f"({report['session_wall_seconds']:.0f} s); wrote "
         f"{', '.join(str(p) for p in written)}")
    return report


def check_fits(spec: SweepSpec) -> None:
    """Refuse trials no node of the connected cluster can hold: Tune would wait for them forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    biggest = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}
    cpus = spec.cpus_per_trial - (DRIVER_CPUS if spec.fleet else 0.0)
    if cpus > biggest["CPU"] + 1e-6 or spec.gpus_per_trial > biggest["GPU"] + 1e-6:
        raise SweepRefused(f"--cpus-per-trial {spec.cpus_per_trial:g} / --gpus-per-trial {spec.gpus_per_trial:g}: "
                           f"{'a fleet trial holds its fleet in one bundle of ' if spec.fleet else 'a trial needs '}"
                           f"{cpus:g} CPU{' and %g GPU' % spec.gpus_per_trial if spec.gpus_per_trial else ''} on one "
                           f"node, and the largest node has {biggest['CPU']:g} CPU, {biggest['GPU']:g} GPU; "
                           f"lower them or add a larger node")


def _plots(report: dict, spec: SweepSpec, sweep_dir: Path, echo) -> list[Path]:
    from sacfleet.sweep.plots import plot_compare, plot_curves

    written = []
    try:
        if plot_curves(report["trials"], [p for p, _ in spec.points()],
                       f"{spec.config}: eval return over seeds", sweep_dir / "curves.png"):
            written.append(sweep_dir / "curves.png")
        if plot_compare(report, sweep_dir / "compare.png"):
            written.append(sweep_dir / "compare.png")
    except (OSError, ValueError) as exc:
        echo(f"plots not written: {exc}")
    return written


def _run_on_tune(spec: SweepSpec, sweep_dir: Path, pending: list[Trial], address: str | None,
                 concurrent: int | None, num_cpus: int | None, echo, out) -> bool:
    """The pending trials as Tune trials; returns whether the sweep was stopped (Ctrl-C, SIGTERM)."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the sweep stops its trials itself, in order
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune logs each failed trial's trace, and notes on its experiment state; the progress view says what
    # became of each trial, and the trace stays in the trial's error.txt under tune/.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    # The trials' runs log to their own files; what Ray's workers print besides is their shutdown noise.
    started_ray = connect(address, num_cpus, dashboard=False, log_to_driver=False)
    stop = threading.Event()
    def recorded(config: dict) -> str | None:
        return (TrialFiles(trial_dir(sweep_dir, Trial(config["point"], (), config["seed"]))).read_outcome()
                or {}).get("cause")

    progress = SweepProgress(out, recorded=recorded, stopping=stop.is_set)
    handlers = {}

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # the second: at once
        stop.set()
        progress.say(f"sweep: {signal.Signals(signum).name}: stopping; no trial starts, each running trial "
                     f"checkpoints and writes its summary (Ctrl-C again to stop at once)")

    try:
        check_fits(spec)
        control = ray.remote(SweepControl).options(num_cpus=0).remote()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, on_signal)
        gcs = address if address and address != "auto" else ray.get_runtime_context().gcs_address
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec.to_dict(), sweep_dir=str(sweep_dir.resolve()),
                                 control=control, address=gcs),
            trial_resources(spec))
        space = {"trial": tune.grid_search([{"point": t.point, "overrides": list(t.overrides), "seed": t.seed}
                                            for t in pending])}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=StopStarting(stop),
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=time.strftime("session-%Y%m%d-%H%M%S"),
                                      storage_path=str((sweep_dir / "tune").resolve()), verbose=0,
                                      callbacks=[progress], stop=StopWhenDrained(stop, control, progress),
                                      failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()
    return stop.is_set()

