"""`r1kit` command line: parse, then call the stage. Each sub-command has --help."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace) -> int:
    from r1kit import demo

    demo.run(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def _info(args: argparse.Namespace) -> int:
    from r1kit.checkpoint import count_params
    from r1kit.config import PRESETS, ModelConfig, preset

    cfg = preset(args.target) if args.target in PRESETS else ModelConfig.load(args.target)
    total, active = count_params(cfg)
    elems = cfg.kv_cache_elements_per_token() * cfg.num_hidden_layers
    print(json.dumps({
        "model_type": cfg.model_type, "params_total": total, "params_active_per_token": active,
        "kv_cache_elements_per_token": elems, "kv_cache_bytes_per_token_bf16": elems * 2,
        "mtp_modules": cfg.num_nextn_predict_layers,
    }, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1kit", description="The DeepSeek-R1 recipe end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: train a tiny DeepSeek-V3 end to end and check every fast path")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)

    p = sub.add_parser("info", help="parameter counts and KV-cache size of a checkpoint or preset")
    p.add_argument("target", help="checkpoint directory, config.json, or a preset (tiny, tiny-dense, deepseek-v3, "
                                  "deepseek-v2-lite)")
    p.set_defaults(func=_info)

    args = parser.parse_args(argv)
    from r1kit.checkpoint import CheckpointError
    from r1kit.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"r1kit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
