"""Evaluate a fine-tuned model saved by a training run (or by memtl.save_pretrained).

    python eval.py run_dir=outputs/rte/lora/<time>       # dev metrics of <run>/model
    python eval.py run_dir=outputs/rte/lora/<time> split=test   # GLUE server files / QA predictions
    python eval.py model_dir=<a saved model folder>
"""
import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from memtl.errors import ConfigError, RunError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from memtl.evaluate import evaluate

    try:
        report = evaluate(cfg.run_dir, cfg.model_dir, cfg.split, cfg.out, cfg.data_root)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else e.exit_code)
    shown = {k: v for k, v in report.items() if k not in ("model_dir", "written")}
    print(json.dumps(shown, indent=2))
    print(f"written: {report['written']}")


if __name__ == "__main__":
    from memtl.preflight import preflight

    try:  # bad input: one line, exit 2, before Hydra starts
        preflight(sys.argv[1:], CONF, "eval")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
