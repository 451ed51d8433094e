"""One fine-tuning run from a composed Hydra config: what ``train.py`` calls.

Order matters for "bad input loses nothing": every cheap check runs before anything is
loaded or written, and ``results.json`` is written whatever happens afterwards
(status ``completed`` / ``interrupted`` / ``failed``).
"""
from __future__ import annotations

import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memtl.errors import ConfigError
from memtl.results import RESULTS_FILE, environment, write_results

log = logging.getLogger("memtl")

PRECISIONS = {"32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true", "16-mixed"}
RUN_KEYS = ("name", "lr")  # method keys that are not options of apply_method


def method_kwargs(method_cfg: DictConfig) -> dict[str, Any]:
    opts = OmegaConf.to_container(method_cfg, resolve=True)
    return {k: v for k, v in opts.items() if k not in RUN_KEYS}


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values a typo or a wrong sign would spoil; one line per problem."""
    from memtl.data import get_task
    from memtl.methods import method_options

    method_options(cfg.method.name, **method_kwargs(cfg.method))
    get_task(cfg.task.name, cfg.task.get("main_metric"))
    o = cfg.optim
    _check(o.lr is not None and o.lr > 0, f"optim.lr={o.lr}: the learning rate must be > 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    _check(o.eps > 0, f"optim.eps={o.eps}: must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)}: two values in [0, 1)")
    _check(0 <= o.warmup_ratio <= 1, f"optim.warmup_ratio={o.warmup_ratio}: must be in [0, 1]")
    d = cfg.data
    _check(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be >= 1")
    _check(d.max_length >= 8, f"data.max_length={d.max_length}: must be >= 8")
    _check(d.root is None or Path(str(d.root)).expanduser().is_dir(),
           f"data.root={d.root} is not a folder: point it at a folder laid out like ../shared/data "
           "(glue_data/<TASK>/train.tsv ...), or null for the default")
    for key in ("max_train_samples", "max_eval_samples"):
        v = d.get(key)
        _check(v is None or v >= 1, f"data.{key}={v}: must be >= 1 (or null for all)")
    precision = str(cfg.trainer.get("precision", "32"))
    _check(precision in PRECISIONS, f"trainer.precision={precision}: choose one of {', '.join(sorted(PRECISIONS))}")
    _check(cfg.backbone.get("source") in ("package", "hub", "random"),
           f"backbone.source={cfg.backbone.get('source')}: choose package, hub or random")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as configured; returns (and writes) the results dict."""
    validate(cfg)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    # under DDP every process runs this function: only rank 0 owns results.json
    output_dir = cfg.paths.output_dir if rank_zero_only.rank == 0 else None
    keep_previous_results(output_dir)
    results: dict[str, Any] = {
        "status": "running",
        "run": {"method": cfg.method.name, "backbone": cfg.backbone.name, "task": cfg.task.name, "seed": cfg.seed},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(),
    }
    write_results(output_dir, results)
    started = time.time()
    trainer = module = monitor = None
    try:
        trainer, module, datamodule, monitor, params = build(cfg)
        results["params"] = params
        write_results(output_dir, results)
        trainer.fit(module, datamodule=datamodule)
        if not module.history and not trainer.interrupted:
            # stopped (max_steps) before any evaluation: evaluate the final weights once
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if d_protocol(cfg) == "lst" and not trainer.interrupted:
            # LST protocol: the official dev set (or its second half) is the test set,
            # scored once with the weights selected on the held-out validation split
            best = getattr(trainer.checkpoint_callback, "best_model_path", None)
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        results["status"] = "interrupted" if trainer.interrupted else "completed"
    except (KeyboardInterrupt, SystemExit) as e:
        results["status"] = "interrupted"
        results["error"] = type(e).__name__
        raise
    except ConfigError as e:
        results["status"] = "failed"
        results["error"] = str(e)
        raise
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc(limit=20)
        raise
    finally:
        results["wall_time_s"] = time.time() - started
        if module is not None:
            results["metrics"] = {k: v for k, v in (module.history[-1] if module.history else {}).items()
                                  if k not in ("epoch", "step")}
            results["history"] = module.history
            results["best"] = module.best
            if module.test_results is not None:
                results["test"] = module.test_results
        if monitor is not None:
            results.update(monitor.summary())
        if trainer is not None:
            results["trainer"] = {"global_step": trainer.global_step, "epochs": trainer.current_epoch}
            ckpt = getattr(trainer.checkpoint_callback, "best_model_path", None)
            results["checkpoint"] = ckpt or None
            _log_summary(trainer, results)
        write_results(output_dir, results)
    return results


def objective(results: dict[str, Any]) -> float | None:
    """A run's value for a sweeper: its best dev value of the main metric.

    None when there is none or it is not finite: hydra-optuna-sweeper records a failed trial
    and goes on (on a NaN it crashes the whole study). A run that breaks raises in ``run``,
    which the sweeper records as a failed trial too.
    """
    value = (results.get("best") or {}).get("value")
    return float(value) if value is not None and math.isfinite(value) else None


def d_protocol(cfg: DictConfig) -> str:
    return str(cfg.data.get("protocol", "dev"))


def keep_previous_results(output_dir: str | None) -> None:
    """A rerun into the same folder must not overwrite an earlier run's results."""
    if output_dir is None:
        return
    path = Path(output_dir) / RESULTS_FILE
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        backup = path.with_name(f"results.previous-{stamp}.json")
        n = 1
        while backup.exists():
            backup = path.with_name(f"results.previous-{stamp}-{n}.json")
            n += 1
        os.replace(path, backup)
        log.warning("kept the earlier %s as %s", RESULTS_FILE, backup.name)


def build(cfg: DictConfig):
    """Tokenizer, data, model + method, module, callbacks, loggers and trainer."""
    import hydra
    import lightning as L

    from memtl.backbones import load_model, load_tokenizer, max_positions
    from memtl.callbacks import MemoryMonitor
    from memtl.data import GlueDataModule, get_task
    from memtl.methods import apply_method, count_parameters
    from memtl.module import FineTuneModule

    _quiet_duplicate_logs()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = get_task(cfg.task.name, cfg.task.get("main_metric"))
    tokenizer = load_tokenizer(cfg.backbone)
    d = cfg.data
    datamodule = GlueDataModule(
        task=task, tokenizer=tokenizer, root=d.root, max_length=d.max_length, batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size, max_train_samples=d.max_train_samples,
        max_eval_samples=d.max_eval_samples, group_by_length=d.group_by_length, num_workers=d.num_workers,
        seed=cfg.seed, cache_dir=d.cache_dir, protocol=d.protocol, split_seed=d.split_seed,
    )
    datamodule.prepare_data()  # missing or malformed data fails here, before the model is loaded

    model = load_model(cfg.backbone, task.num_labels, tokenizer)
    limit = max_positions(model)
    _check(limit is None or cfg.data.max_length <= limit,
           f"data.max_length={cfg.data.max_length} exceeds backbone {cfg.backbone.name}'s {limit} positions: "
           f"set data.max_length<={limit}")
    model = apply_method(model, cfg.method.name, **method_kwargs(cfg.method))
    model.train()  # from_pretrained returns eval mode and Lightning keeps modes as found: dropout on
    params = count_parameters(model)
    log.info("method %s on %s: %s trainable of %s parameters (%.2f%%)", cfg.method.name, cfg.backbone.name,
             f"{params['trainable']:,}", f"{params['total']:,}", 100 * params["trainable"] / params["total"])

    module = FineTuneModule(model, task, OmegaConf.to_container(cfg.optim, resolve=True),
                            config=OmegaConf.to_container(cfg, resolve=True))

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None and "_target_" in c]
    group = _sweep_group()
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg is None or "_target_" not in lg:
            continue  # settings for a logger not selected (a sweep's logger.wandb.group under logger=csv)
        if group and "WandbLogger" in str(lg.get("_target_")) and lg.get("group") is None:
            lg = OmegaConf.merge(lg, {"group": group})  # one W&B group per sweep
        loggers.append(hydra.utils.instantiate(lg))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "params": params})
    monitor = next((c for c in callbacks if isinstance(c, MemoryMonitor)), None)
    return trainer, module, datamodule, monitor, params


def _sweep_group() -> str | None:
    """The sweep folder (e.g. ``multirun/2026-11-23_10-00-00``) under ``-m``, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched by Hydra (tests, notebooks)
        return None
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _quiet_duplicate_logs() -> None:
    # Lightning adds its own console handler and also propagates to the root logger that
    # Hydra configures (console + train.log): keep the root one, so each line shows once
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True


def _log_summary(trainer, results: dict[str, Any]) -> None:
    """The final figures into every logger's summary (W&B: the run's summary panel)."""
    flat = {"status": results["status"], **{f"params/{k}": v for k, v in (results.get("params") or {}).items()}}
    if results.get("best"):
        flat[f"best/{results['best']['metric']}"] = results["best"]["value"]
        flat["best/epoch"] = results["best"]["epoch"]
    for lg in trainer.loggers:
        exp = getattr(lg, "experiment", None)
        summary = getattr(exp, "summary", None)
        if summary is not None and hasattr(summary, "update"):
            summary.update(flat)
        else:
            lg.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        lg.finalize(results["status"] if results["status"] != "completed" else "success")
        if callable(getattr(exp, "finish", None)):
            # close the W&B run: otherwise the next job of a sweep (same process) reuses it
            exp.finish(exit_code=0 if results["status"] == "completed" else 1)
