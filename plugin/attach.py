"""`forkwatch.attach(trainer, **options)`: one line on an unmodified `trl.GRPOTrainer`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

from forkwatch.plugin.callback import ForkwatchCallback
from forkwatch.plugin.config import ForkwatchConfig
from forkwatch.store.location import resolve
from packaging.version import Version

logger = logging.getLogger(__name__)
TESTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high): the seams were verified on this range
_SEAMS = ("_generate_and_score_completions", "_calculate_rewards", "_compute_loss", "get_high_entropy_mask",
          "accelerator", "temperature", "top_entropy_quantile")


def attach(trainer, **options) -> ForkwatchCallback:
    """Install forkwatch on `trainer` (before `trainer.train()`); options are `ForkwatchConfig` fields."""
    import trl
    from trl import GRPOTrainer

    valid = {f.name for f in dataclasses.fields(ForkwatchConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown forkwatch option(s) {unknown}; valid options: {sorted(valid)}")
    config = ForkwatchConfig(**options)  # every option checked here (ValueError naming the fix), none at train start
    resolve(config.log_dir).probe()  # an unreachable bucket or bad credentials: refused now, not after training

    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"forkwatch.attach needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    version = Version(trl.__version__)
    if not TESTED_TRL[0] <= version < TESTED_TRL[1]:
        warnings.warn(
            f"forkwatch was tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}; trl {version} may have moved the "
            "seams forkwatch hooks into. Pin trl to the tested range if records look wrong.",
            stacklevel=2,
        )
    missing = [s for s in _SEAMS if not hasattr(trainer, s)]
    if missing:
        raise ValueError(f"trl {version} GRPOTrainer lacks {missing}: install trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}")
    if getattr(trainer, "_forkwatch", None) is not None:
        raise ValueError("forkwatch is already attached to this trainer: call attach() once per trainer")
    if getattr(trainer.args, "use_liger_kernel", False) and getattr(trainer.args, "use_liger_loss", False):
        raise ValueError("forkwatch needs TRL's fused LM head; set use_liger_loss=False")

    selector = None
    if config.select is not None:
        from forkwatch.plugin.policy_loss import validate_selection
        from forkwatch.plugin.registry import get_selector

        selector = get_selector(config.select, **config.selector_options())
        validate_selection(selector, trainer.args)
        if selector.needs_group_js and config.group_js is False:
            raise ValueError(f"select={config.select!r} scores tokens by group_js: set group_js='auto' or True")

    from forkwatch.plugin.head import HeadProjector
    from forkwatch.plugin.hooks import install, target_model
    from forkwatch.plugin.monitor import Monitor

    target = target_model(trainer)
    monitor = Monitor(
        trainer, config, selector=selector, project=HeadProjector(target, trainer.temperature),
        backbone=target.base_model,
    )
    probes = None
    if config.probe_every > 0:  # built here: probe texts that do not encode are refused at attach
        from forkwatch.plugin.probes import ProbeRunner

        probes = ProbeRunner(trainer, pairs=config.probes, every=config.probe_every, count=config.probe_count,
                             top_k=config.fork_top_k)
    callback = ForkwatchCallback(config, trainer=trainer, monitor=monitor, probes=probes,
                                 install=lambda: install(trainer, monitor))
    callback.install()
    # First in the list: our on_log must add forkwatch/... to `logs` before report_to integrations see them.
    trainer.callback_handler.callbacks.insert(0, callback)

    original_train = trainer.train

    @functools.wraps(original_train)
    def train(resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(trainer.args.output_dir)
        callback.prepare_resume(checkpoint or None)
        callback.install()  # a second train() on this trainer: the first one's end removed the seams
        try:
            return original_train(resume_from_checkpoint, *args, **kwargs)
        except KeyboardInterrupt:
            callback.close("stopped")  # a person stopped it: everything flushed so far stays readable
            raise
        except BaseException:
            callback.close("failed")
            raise

    trainer.train = train
    trainer._forkwatch = callback
    logger.info("forkwatch attached (select=%s, group_js=%s)", config.select, monitor.group_js_on)
    return callback
