"""Command line: `sacfleet train` and `sacfleet eval`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sacfleet", description="Distributed Soft Actor-Critic.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an agent")
    train.add_argument("--config", default="pointmass",
                       help="preset name (pointmass, pendulum, halfcheetah, ...) or a YAML file; default pointmass")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set learner.batch_size=512 (repeatable)")
    train.add_argument("--run-dir", type=Path, help="output directory; default runs/<config>-<time>")
    train.add_argument("--inline", action="store_true",
                       help="run every component in lockstep in this process, without Ray (deterministic)")
    train.add_argument("--address", help="join an existing Ray cluster (auto or HOST:PORT)")
    train.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")

    ev = sub.add_parser("eval", help="evaluate a checkpoint with deterministic actions")
    ev.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file or run directory")
    ev.add_argument("--episodes", type=int, default=20)
    ev.add_argument("--seed", type=int, help="evaluation seed; default the run's eval.seed")
    return parser


def _train(args) -> int:
    from sacfleet.common.config import load_config
    from sacfleet.inline import train_inline

    if args.resume is not None:
        print("sacfleet train: --resume comes with the distributed runtime and is not available yet",
              file=sys.stderr)
        return EXIT_USAGE
    if not args.inline or args.address:
        print("sacfleet train: the Ray fleet is not built yet; run with --inline (same components, one process)",
              file=sys.stderr)
        return EXIT_USAGE
    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_inline(cfg, run_dir)
    return 0


def _eval(args) -> int:
    import torch

    from sacfleet.actors.evaluate import evaluate
    from sacfleet.common.config import from_dict
    from sacfleet.learner.checkpoint import load_checkpoint
    from sacfleet.learner.networks import Actor

    if args.episodes < 1:
        print("sacfleet eval: --episodes must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    state = load_checkpoint(args.checkpoint)
    cfg, info = from_dict(state["config"]), state["env_info"]
    actor = Actor(info["obs_dim"], info["act_dim"], cfg.learner.hidden_sizes, info["action_low"], info["action_high"])
    actor.load_state_dict(state["learner"]["actor"])
    torch.set_num_threads(1)
    returns = evaluate(actor, cfg.env, args.episodes, cfg.eval.seed if args.seed is None else args.seed)
    print(f"{cfg.env.id}: eval return {returns.mean():.2f} +- {returns.std():.2f} over {returns.size} episodes "
          f"(checkpoint at {state['env_steps']:,} env steps, {state['learner']['updates']:,} updates)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sacfleet.common.config import ConfigError
    from sacfleet.inline import RunDirInUse
    from sacfleet.learner.checkpoint import CheckpointError
    from sacfleet.replay_server.storage import ReplayMemoryError

    args = _parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (ConfigError, CheckpointError, ReplayMemoryError, RunDirInUse) as exc:
        print(f"sacfleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
