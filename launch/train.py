"""python -m launch.train CONFIG [section.key=value ...] [--print-config]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffusion_dist.config import ConfigError, load_config, to_yaml
from diffusion_dist.distributed import world_size_from_env


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description="Train a conditional latent diffusion model with DeepSpeed ZeRO.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=1000")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (secrets redacted) and exit"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, world_size=world_size_from_env())
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    print("error: the DeepSpeed trainer is coming (issue #5); use --print-config to check a config", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
