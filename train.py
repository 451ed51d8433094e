"""Fine-tune a Hugging Face model with a memory-efficient method.

    python train.py method=lora task=glue/rte          # one run
    python train.py -m method=full,lora task=glue/rte  # a sweep
    python train.py -m +sweep=optuna_lr method=lora    # an Optuna search of the lr (sweeps/README.md)
    python train.py --help                             # groups and options
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from memtl.errors import ConfigError, RunError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from memtl.run import objective, run

    try:
        results = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:  # a NaN loss, SIGTERM ...: results.json says failed/interrupted, with the same line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    return objective(results)  # what an Optuna sweep maximises (sweeps/optuna_lr.yaml)


if __name__ == "__main__":
    from memtl.preflight import preflight

    try:  # bad input: one line, exit 2, before Hydra creates any folder
        preflight(sys.argv[1:], CONF)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
