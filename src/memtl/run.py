"""One fine-tuning run from a composed Hydra config: what ``train.py`` calls.

Order matters for "bad input loses nothing": every cheap check runs before anything is
loaded or written, and ``results.json`` is written whatever happens afterwards
(status ``completed`` / ``interrupted`` / ``failed``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memtl.errors import ConfigError, RunError, RunInterrupted
from memtl.methods.options import is_int, is_number
from memtl.results import RESULTS_FILE, device_info, environment, write_results

log = logging.getLogger("memtl")

PRECISIONS = {"32", "32-true", "64", "64-true", "bf16-mixed", "bf16-true", "16-mixed"}
GUARD_MODES = ("stop", "skip")  # guard.nonfinite (memtl.callbacks.guard)
RUN_KEYS = ("name", "lr")  # method keys that are not options of apply_method


def method_kwargs(method_cfg: DictConfig) -> dict[str, Any]:
    opts = OmegaConf.to_container(method_cfg, resolve=True)
    return {k: v for k, v in opts.items() if k not in RUN_KEYS}


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values a typo or a wrong sign would spoil; one line per problem.
    Also fills ``method.lr: null`` (every entry passes here before the lr is read)."""
    from memtl.data import get_task
    from memtl.data.glue import check_pair_encoding
    from memtl.data.loading import check_data_options
    from memtl.methods import method_options

    fill_family_lr(cfg)
    method_options(cfg.method.name, **method_kwargs(cfg.method))
    task = get_task(cfg.task.name, cfg.task.get("main_metric"), cfg.task.get("length_norm"))
    _check(getattr(task, "family", "glue") != "qa" or d_protocol(cfg) == "dev",
           f"data.protocol={d_protocol(cfg)} is a GLUE protocol; {task.name} trains on train, selects on "
           "validation and reports test: set data.protocol=dev")
    if getattr(task, "family", "glue") == "qa" and cfg.backbone.get("model_type"):
        from memtl.backbones import qa_head

        head = qa_head(cfg.backbone.model_type)  # an architecture without QA support: say so before loading
        _check(cfg.method.name != "head" or head == "multiple_choice",
               f"method=head with {cfg.backbone.name} on {task.name}: this backbone scores the choices with its "
               "LM head (tied to the input embeddings), so there is no separate head to train; use an encoder "
               "backbone (multiple-choice head) or another method")
    _check(is_int(cfg.seed), f"seed={cfg.seed}: must be an integer")
    _check(isinstance(cfg.data.get("test", True), bool), f"data.test={cfg.data.get('test')}: must be true or false")
    _check(isinstance(cfg.get("eval_before", False), bool),
           f"eval_before={cfg.get('eval_before')}: must be true or false")
    o = cfg.optim
    _check(is_number(o.lr) and o.lr > 0, f"optim.lr={o.lr}: the learning rate must be > 0")
    _check(is_number(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    _check(is_number(o.eps) and o.eps > 0, f"optim.eps={o.eps}: must be > 0")
    _check(len(o.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in o.betas),
           f"optim.betas={list(o.betas)}: two values in [0, 1)")
    _check(is_number(o.warmup_ratio) and 0 <= o.warmup_ratio <= 1,
           f"optim.warmup_ratio={o.warmup_ratio}: must be in [0, 1]")
    ws = o.get("warmup_steps")
    _check(ws is None or is_int(ws) and ws >= 0, f"optim.warmup_steps={ws}: must be an integer >= 0 (or null)")
    d = cfg.data
    pairs = d.get("pair_encoding", "cross")
    if getattr(task, "family", "glue") == "qa":
        _check(pairs == "cross",
               f"data.pair_encoding={pairs} is a GLUE option; {task.name} is a QA task: set data.pair_encoding=cross")
    else:
        check_pair_encoding(pairs, task)
    if pairs == "siamese" and cfg.backbone.get("model_type"):
        from memtl.siamese import ENCODER_TYPES

        _check(cfg.backbone.model_type in ENCODER_TYPES,
               f"data.pair_encoding=siamese needs an encoder backbone ({', '.join(ENCODER_TYPES)}); "
               f"{cfg.backbone.name} is {cfg.backbone.model_type}: set data.pair_encoding=cross")
    check_data_options(protocol=d.protocol, split_seed=d.split_seed, max_length=d.max_length,
                       batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, num_workers=d.num_workers,
                       max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples)
    _check(d.max_length >= 8, f"data.max_length={d.max_length}: must be >= 8")
    _check(d.root is None or Path(str(d.root)).expanduser().is_dir(),
           f"data.root={d.root} is not a folder: point it at a folder laid out like ../shared/data "
           "(glue_data/<TASK>/train.tsv ...), or null for the default")
    t = cfg.trainer
    steps, epochs = t.get("max_steps", -1), t.get("max_epochs")
    _check(is_int(steps) and (steps >= 1 or steps == -1),
           f"trainer.max_steps={steps}: must be >= 1, or -1 for no limit (trainer.max_epochs then ends the run)")
    _check(epochs is None or is_int(epochs) and (epochs >= 1 or epochs == -1),
           f"trainer.max_epochs={epochs}: must be >= 1, or -1 for no limit (trainer.max_steps then ends the run)")
    _check(steps != -1 or epochs != -1,
           f"trainer.max_epochs={epochs} with trainer.max_steps=-1: the run would never end; "
           "set trainer.max_epochs>=1 or trainer.max_steps>=1")
    precision = str(cfg.trainer.get("precision", "32"))
    _check(precision in PRECISIONS, f"trainer.precision={precision}: choose one of {', '.join(sorted(PRECISIONS))}")
    _check(cfg.backbone.get("source") in ("package", "hub", "random"),
           f"backbone.source={cfg.backbone.get('source')}: choose package, hub or random")
    if cfg.backbone.get("source") == "random":
        from memtl.backbones import random_shape

        random_shape(cfg.backbone)  # a known geometry, of the entry's model type
    _check(cfg.guard.nonfinite in GUARD_MODES, f"guard.nonfinite={cfg.guard.nonfinite}: choose stop or skip")
    _check(cfg.get("resume", "auto") in ("auto", "never"), f"resume={cfg.get('resume')}: choose auto or never")
    last = (cfg.get("callbacks") or {}).get("last_checkpoint")
    _check(last is None or last.every_n_steps >= 1,
           f"callbacks.last_checkpoint.every_n_steps={last and last.every_n_steps}: must be >= 1")


def fill_family_lr(cfg: DictConfig) -> None:
    """``method.lr: null`` becomes the method's lr for the backbone's family (SHERL: decoder
    LMs and the rest differ), so results.json and the checkpoint record the number."""
    if "lr" in cfg.method and cfg.method.lr is None:
        from memtl.backbones import model_type
        from memtl.methods import default_lr

        cfg.method.lr = default_lr(cfg.method.name, model_type(cfg.backbone))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as configured; returns (and writes) the results dict."""
    validate(cfg)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from memtl.callbacks import NonFiniteGuard

    # under DDP every process runs this function: only rank 0 owns results.json
    output_dir = cfg.paths.output_dir if rank_zero_only.rank == 0 else None
    resume = find_resume(cfg)  # before anything is moved or written: a mismatch loses nothing
    keep_previous_results(output_dir, csv_metrics_path(cfg))
    results: dict[str, Any] = {
        "status": "running",
        "run": {"method": cfg.method.name, "backbone": cfg.backbone.name, "task": cfg.task.name, "seed": cfg.seed},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": environment(),
        "resumed": resume,
    }
    if resume:
        log.info("resuming from %s (global step %d, epoch %d)", resume["from"], resume["global_step"], resume["epoch"])
    write_results(output_dir, results)
    started = time.time()
    trainer = module = monitor = None
    try:
        trainer, module, datamodule, monitor, params = build(cfg, resuming=resume is not None)
        results["environment"].update(device_info(trainer.strategy.root_device))  # what accelerator=auto chose
        results["params"] = params
        from memtl.pretrained import unwrap

        stamp = unwrap(module.model)[0].memtl_method  # options resolved for this backbone, and their defaults
        results["method"] = {"options": stamp["options"], "defaults": stamp["defaults"]}
        write_results(output_dir, results)
        if resume:
            check_resumed_weights(resume["from"], module.model)
        if cfg.get("eval_before") and not resume:
            # the starting point (pre-trained model + method at init) on the dev split; kept
            # apart from the training history so model selection only sees trained weights
            trainer.validate(module, datamodule=datamodule, verbose=False)
            initial = module.history.pop()
            module.best = None
            results["initial"] = {k: v for k, v in initial.items() if k not in ("epoch", "step")}
            log.info("before training: %s", " ".join(f"{k}={v:.4f}" for k, v in results["initial"].items()))
            write_results(output_dir, results)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume["from"] if resume else None)
        if not module.history and not trainer.interrupted:
            # stopped (max_steps) before any evaluation: evaluate the final weights once
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if cfg.data.get("test", True) and (d_protocol(cfg) == "lst" or getattr(datamodule, "has_test", False)) \
                and not trainer.interrupted:
            # LST protocol: the official dev set (or its second half) is the test set; QA tasks
            # with a labeled test split: that split. Scored once with the selected weights
            best = getattr(trainer.checkpoint_callback, "best_model_path", None)
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        results["baseline"] = majority_baseline(datamodule)
        results["status"] = "interrupted" if trainer.interrupted else "completed"
        if results["status"] == "completed":
            finish_last_checkpoint(trainer)
            if output_dir is not None:
                results["model_dir"] = str(save_run_model(trainer, module, datamodule, cfg, results, monitor))
    except (KeyboardInterrupt, SystemExit) as e:
        # SIGTERM (Lightning stops after the batch, last.ckpt saved) or Ctrl-C (Lightning exits)
        sigterm = trainer is not None and trainer.received_sigterm
        results["status"] = "interrupted"
        results["error"] = (f"interrupted ({'SIGTERM' if sigterm else type(e).__name__}) at global step "
                            f"{trainer.global_step if trainer is not None else 0}: rerun the same command to resume")
        raise RunInterrupted(results["error"], 143 if sigterm else 130) from e
    except (ConfigError, RunError) as e:  # the user's to fix: the one line says it all
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
            if module.diagnostics():
                results["diagnostics"] = module.diagnostics()
            if module.test_results is not None:
                results["test"] = module.test_results
        if monitor is not None:
            results.update(monitor.summary())
        if trainer is not None:
            guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
            if guard is not None:
                results["guard"] = guard.summary()
            results["trainer"] = {"global_step": trainer.global_step, "epochs": trainer.current_epoch}
            ckpt = getattr(trainer.checkpoint_callback, "best_model_path", None)
            results["checkpoint"] = ckpt or None
            last = last_checkpoint(trainer)
            # where an unfinished run resumes from (a completed run's is renamed final.ckpt)
            results["last_checkpoint"] = str(last.path) if last is not None and last.path.exists() else None
            _log_summary(trainer, results)
        write_results(output_dir, results)
    return results


def save_run_model(trainer, module, datamodule, cfg: DictConfig, results: dict[str, Any], monitor) -> Path:
    """``<run>/model``: the best checkpoint's weights (the last ones without a checkpoint) as
    a ``memtl.save_pretrained`` folder, with the tokenizer and a model card."""
    import torch

    from memtl.pretrained import save_pretrained

    best = getattr(trainer.checkpoint_callback, "best_model_path", None)
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        missing, unexpected = module.load_state_dict(state, strict=False)
        trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise RunError(f"{best} does not fit the trained model ({len(unexpected)} unexpected, "
                           f"{len(trainable & set(missing))} missing weights): rerun with resume=never")
    best_metrics = {k: round(v, 4) for k, v in ((module.best or {}).get("metrics") or {}).items()}
    memory = (monitor.summary()["memory"]["peak_step_mib"] if monitor is not None else None)
    card = {"task": f"{cfg.task.name} ({d_protocol(cfg)} protocol)",
            "dev": ", ".join(f"{k} {v}" for k, v in best_metrics.items()) or None,
            "peak_step_memory": f"{memory:.0f} MiB" if memory else None,
            "command": _command()}
    training = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                if k in ("seed", "backbone", "method", "task", "data", "trainer")}
    return save_pretrained(module.model, Path(str(cfg.paths.output_dir)) / "model",
                           tokenizer=getattr(datamodule, "tokenizer", None), card=card, training=training)


def _command() -> str | None:
    """The command line that trained this run (Hydra's overrides), for the model card."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return None
    return "python train.py " + " ".join(overrides)


def majority_baseline(datamodule) -> dict | None:
    """The majority-class scores on the dev split(s) (``memtl.metrics.majority_class_baseline``),
    for GLUE classification tasks; None where there is no such floor (regression, QA)."""
    from memtl.data.glue import GlueDataModule
    from memtl.metrics import majority_class_baseline

    if not isinstance(datamodule, GlueDataModule) or datamodule.train_set is None or not datamodule.eval_sets:
        return None
    return majority_class_baseline(datamodule.task, datamodule.train_set.labels,
                                   [ds.labels for ds in datamodule.eval_sets])


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


def keep_previous_results(output_dir: str | None, *more: Path | None) -> None:
    """A rerun into the same folder must not overwrite an earlier run's results (nor, with
    the CSV logger, which deletes it on start, its metrics.csv)."""
    if output_dir is None:
        return
    for path in (Path(output_dir) / RESULTS_FILE, *more):
        if path is None or not path.exists():
            continue
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        backup = path.with_name(f"{path.stem}.previous-{stamp}{path.suffix}")
        n = 1
        while backup.exists():
            backup = path.with_name(f"{path.stem}.previous-{stamp}-{n}{path.suffix}")
            n += 1
        os.replace(path, backup)
        log.warning("kept the earlier %s as %s", path.name, backup.name)


def csv_metrics_path(cfg: DictConfig) -> Path | None:
    c = (cfg.get("logger") or {}).get("csv")
    if c is None or not str(c.get("_target_", "")).endswith("CSVLogger"):
        return None
    return Path(str(c.save_dir)) / str(c.get("name") or "lightning_logs") / str(c.get("version") or "") / "metrics.csv"


# -- resume -------------------------------------------------------------------------------
# keys that may differ between the interrupted run and its resumption
RESUME_FREE_KEYS = ("paths", "resume", "guard", "logger", "cluster", "trainer.enable_progress_bar")


def last_checkpoint_path(cfg: DictConfig) -> Path | None:
    for c in (cfg.get("callbacks") or {}).values():
        if c is not None and str(c.get("_target_", "")).endswith("LastCheckpoint"):
            return Path(str(c.dirpath)) / "last.ckpt"
    return None


def last_checkpoint(trainer):
    from memtl.callbacks import LastCheckpoint

    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)


def find_resume(cfg: DictConfig) -> dict[str, Any] | None:
    """``resume=auto``: an unfinished run in this output folder left ``last.ckpt``: continue
    from it, provided the settings are the same (otherwise one line says which differ)."""
    path = last_checkpoint_path(cfg)
    if cfg.get("resume", "auto") == "never" or path is None or not path.exists():
        return None
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: reads no weights
    except Exception as e:
        raise ConfigError(f"cannot read {path} to resume from ({type(e).__name__}: {e}): "
                          "add resume=never to start over") from None
    saved = ckpt.get("memtl") or {}
    before = _flat(saved.get("config") or {})
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    # the method options as resolved for the backbone (checkpoints since this was recorded)
    resolved = {f"method.{k}": v for k, v in (saved.get("method") or {}).items()}
    diff = sorted(k for k in before.keys() | now.keys()
                  if before.get(k, "<unset>") != now.get(k, "<unset>")
                  and not (k in resolved and now.get(k) == resolved[k])  # pinned to what it resolved to
                  and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS))
    if diff:
        def was(k):
            b = before.get(k, "<unset>")
            return f"{b} (resolved {resolved[k]})" if k in resolved and resolved[k] != b else b

        shown = ", ".join(f"{k}: {was(k)} -> {now.get(k, '<unset>')}" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(f"{path} is an unfinished run with other settings ({shown}{more}): rerun it with the "
                          "same settings to resume it, or add resume=never to start over")
    if saved.get("method") is not None:
        check_resolved_options(path, saved["method"], cfg)
    previous = Path(str(cfg.paths.output_dir)) / RESULTS_FILE
    try:
        status = json.loads(previous.read_text()).get("status")
    except (OSError, ValueError):
        status = None
    return {"from": str(path), "global_step": ckpt["global_step"], "epoch": ckpt["epoch"], "previous_status": status}


def check_resolved_options(path: Path, saved: dict[str, Any], cfg: DictConfig) -> None:
    """The same settings may resolve otherwise in this version (a family default that changed):
    one line naming the options to pin, before anything is written."""
    import dataclasses

    from memtl.backbones import load_config
    from memtl.methods import plain_options, resolved_options

    now = plain_options(dataclasses.asdict(resolved_options(cfg.method.name, load_config(cfg.backbone),
                                                            **method_kwargs(cfg.method))))
    changed = [k for k in saved if k in now and saved[k] != now[k]]
    if not changed:
        return
    shown = ", ".join(f"method.{k}: {saved[k]} -> {now[k]}" for k in changed[:3])
    fix = (f"add {' '.join(f'method.{k}={_override_value(saved[k])}' for k in changed)} to resume it"
           if all(saved[k] is not None for k in changed) else "resume it with the memtl version that wrote it")
    raise ConfigError(f"{path} is an unfinished run whose method options this version resolves otherwise ({shown}; "
                      f"a default may have changed): {fix}, or add resume=never to start over")


def check_resumed_weights(path: str, model) -> None:
    """After the model is built, before the optimizer state is restored: the unfinished run's
    trainable weights (names and shapes) must be the ones this version trains. A checkpoint that
    records no resolved options, or a default set inside a method, would otherwise end in
    the optimizer's or load_state_dict's error."""
    import torch

    from memtl.pretrained import peft_key_names

    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: reads no weights
    kept = {k: tuple(v.shape) for k, v in
            peft_key_names(ckpt["state_dict"], {f"model.{k}": None for k in model.state_dict()}).items()}
    trainable = {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if kept == trainable:
        return
    odd = sorted(kept.keys() ^ trainable.keys()) or sorted(k for k in kept if kept[k] != trainable[k])
    example = (odd[0] if odd[0] not in kept or odd[0] not in trainable else
               f"{odd[0]}: {list(kept[odd[0]])} in the run, {list(trainable[odd[0]])} here")
    raise ConfigError(f"{path} is an unfinished run with other trainable weights than this version builds "
                      f"({len(kept.keys() - trainable.keys())} only in the run, {len(trainable.keys() - kept.keys())} "
                      f"only here, {sum(kept[k] != trainable[k] for k in kept.keys() & trainable.keys())} of "
                      f"another shape; e.g. {example}): resume it with the memtl version that wrote it, or add "
                      "resume=never to start over")


def _override_value(value: Any) -> str:
    """``value`` as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def finish_last_checkpoint(trainer) -> None:
    """A completed run's last.ckpt becomes final.ckpt (the final weights): nothing to resume."""
    last = last_checkpoint(trainer)
    if last is not None and trainer.is_global_zero and last.path.exists():
        os.replace(last.path, last.path.with_name("final.ckpt"))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(cfg: DictConfig, resuming: bool = False):
    """Tokenizer, data, model + method, module, callbacks, loggers and trainer. ``resuming``:
    the run continues an unfinished one in its folder (W&B: the same run)."""
    fill_family_lr(cfg)  # (validate does it too; build may be called on its own)
    import hydra
    import lightning as L

    from memtl.backbones import load_model, load_tokenizer, max_positions
    from memtl.callbacks import MemoryMonitor, NonFiniteGuard
    from memtl.methods import apply_method, count_parameters
    from memtl.module import FineTuneModule
    from memtl.scoring import MultipleChoiceModel
    from memtl.siamese import SiameseModel, siamese_head

    _quiet_duplicate_logs()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(cfg.backbone)
    task, head, datamodule = build_data(cfg, tokenizer)
    qa = getattr(task, "family", "glue") == "qa"
    d = cfg.data

    model = load_model(cfg.backbone, task.num_labels, tokenizer, head=head)
    limit = max_positions(model)
    _check(limit is None or cfg.data.max_length <= limit,
           f"data.max_length={cfg.data.max_length} exceeds backbone {cfg.backbone.name}'s {limit} positions: "
           f"set data.max_length<={limit}")
    siamese = not qa and d.get("pair_encoding", "cross") == "siamese"
    if siamese:  # the pair head first, so that the method keeps it trainable like any head
        model = siamese_head(model)
    model = apply_method(model, cfg.method.name, **method_kwargs(cfg.method))
    if siamese:
        model = SiameseModel(model)
    if qa:  # one score per choice (memtl.scoring): logits (batch, choices) and their cross-entropy
        model = MultipleChoiceModel(model, head, task.length_norm)
    model.train()  # from_pretrained returns eval mode and Lightning keeps modes as found: dropout on
    params = count_parameters(model)
    log.info("method %s on %s: %s trainable of %s parameters (%.2f%%)", cfg.method.name, cfg.backbone.name,
             f"{params['trainable']:,}", f"{params['total']:,}", 100 * params["trainable"] / params["total"])

    module = FineTuneModule(model, task, OmegaConf.to_container(cfg.optim, resolve=True),
                            config=OmegaConf.to_container(cfg, resolve=True))

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None and "_target_" in c]
    callbacks.append(NonFiniteGuard(cfg.guard.nonfinite))
    group = _sweep_group()
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg is None or "_target_" not in lg:
            continue  # settings for a logger not selected (a sweep's logger.wandb.group under logger=csv)
        if "WandbLogger" in str(lg.get("_target_")):
            if group and lg.get("group") is None:
                lg = OmegaConf.merge(lg, {"group": group})  # one W&B group per sweep
            if lg.get("id") is None:  # a resumed run continues its W&B run
                lg = OmegaConf.merge(lg, {"id": wandb_run_id(cfg.paths.output_dir, resuming)})
        loggers.append(hydra.utils.instantiate(lg))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "params": params})
    monitor = next((c for c in callbacks if isinstance(c, MemoryMonitor)), None)
    return trainer, module, datamodule, monitor, params


def build_data(cfg: DictConfig, tokenizer):
    """The task, the model head it needs and its data module (prepared: missing or malformed
    data fails here, before a model is loaded)."""
    from memtl.backbones import model_type, qa_head
    from memtl.data import GlueDataModule, QADataModule, get_task

    task = get_task(cfg.task.name, cfg.task.get("main_metric"), cfg.task.get("length_norm"))
    qa = getattr(task, "family", "glue") == "qa"
    # GLUE: a sequence-classification head; QA: the LM head (decoders, BART) or a multiple-choice head
    head = qa_head(model_type(cfg.backbone)) if qa else "sequence_classification"
    d = cfg.data
    common = dict(task=task, tokenizer=tokenizer, root=d.root, max_length=d.max_length, batch_size=d.batch_size,
                  eval_batch_size=d.eval_batch_size, max_train_samples=d.max_train_samples,
                  max_eval_samples=d.max_eval_samples, group_by_length=d.group_by_length,
                  num_workers=d.num_workers, seed=cfg.seed, protocol=d.protocol)
    if qa:
        datamodule = QADataModule(head=head, **common)
    else:
        datamodule = GlueDataModule(cache_dir=d.cache_dir, split_seed=d.split_seed,
                                    pair_encoding=d.get("pair_encoding", "cross"), **common)
    datamodule.prepare_data()
    return task, head, datamodule


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(output_dir: str, resuming: bool) -> str:
    """The W&B run id of the run in ``output_dir``: when resuming, the one kept there by the
    earlier part of this run (so it continues the same W&B run); else a new one, kept for
    a later resume."""
    path = Path(str(output_dir)) / WANDB_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    import secrets
    import string

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


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
