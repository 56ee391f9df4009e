"""`forkwatch.attach(trainer, **options)`: one line on an unmodified `trl.GRPOTrainer`.

Everything is checked here, before training: the options (config.py), the log directory (reachable and writable),
the installed TRL (plugin/trl_seams.py: every internal forkwatch uses, and whether TRL's own loss pass can run on
this machine), the selector with the trainer's settings (plugin/selection/), fork value during training with what
the trainer generates and rewards with (plugin/fork_value_online.py). Then the capture is built, the seams are
installed and the callback goes first in the trainer's list.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from forkwatch.plugin import trl_seams
from forkwatch.plugin.callback import ForkwatchCallback
from forkwatch.plugin.capture import Capture
from forkwatch.plugin.config import RENAMED, ForkwatchConfig
from forkwatch.plugin.gen_evidence import HeadProjector
from forkwatch.plugin.lens_budget import LensClock
from forkwatch.store.location import resolve

logger = logging.getLogger(__name__)


def attach(trainer, **options) -> ForkwatchCallback:
    """Install forkwatch on `trainer` (before `trainer.train()`); options are `ForkwatchConfig` fields."""
    from trl import GRPOTrainer

    valid = {f.name for f in dataclasses.fields(ForkwatchConfig)}
    unknown = sorted(set(options) - valid - set(RENAMED))
    if unknown:
        raise ValueError(f"unknown forkwatch option(s) {unknown}; valid options: {sorted(valid)}")
    config = ForkwatchConfig(**options)  # every option checked here (ValueError naming the fix), none at train start
    resolve(config.log_dir).probe()  # an unreachable bucket or bad credentials: refused now, not after training

    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"forkwatch.attach needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    loss_path = trl_seams.check(trainer)  # every TRL internal forkwatch uses; how the loss pass is read
    if getattr(trainer, "_forkwatch", None) is not None:
        raise ValueError("forkwatch is already attached to this trainer: call attach() once per trainer")

    selector = None
    if config.select is not None:
        from forkwatch.plugin.selection.policy_loss import validate_selection
        from forkwatch.plugin.selection.registry import get_selector

        selector = get_selector(config.select, **config.selector_options())
        validate_selection(selector, trainer.args)
        if selector.needs_group_js and config.group_js is False:
            raise ValueError(f"select={config.select!r} scores tokens by group_js: set group_js='auto' or True")

    target = trl_seams.target_model(trainer)
    clock = LensClock.from_config(config)  # when the periodic lenses run (the lens budget)
    probes = None
    if config.probe_every > 0:  # built here: probe texts that do not encode are refused at attach
        from forkwatch.plugin.lenses import ProbeRunner

        probes = ProbeRunner(trainer, pairs=config.probes, count=config.probe_count, top_k=config.fork_top_k,
                             clock=clock)
    capture = Capture(trainer, config, selector=selector, project=HeadProjector(target, trainer.temperature),
                      backbone=target.base_model, lens_clock=clock, probes=probes)
    fork_value = None
    if config.fork_value_every > 0:  # built here: what it cannot reproduce (vLLM, tools, ...) is refused at attach
        from forkwatch.plugin.fork_value_online import OnlineForkValue

        acc = trainer.accelerator
        fork_value = OnlineForkValue(trainer, config, rank=acc.process_index, world=acc.num_processes)
    callback = ForkwatchCallback(config, trainer=trainer, capture=capture, probes=probes, loss_path=loss_path,
                                 fork_value=fork_value, install=lambda: trl_seams.install(trainer, capture, loss_path))
    callback.install()
    # First in the list: at each step end forkwatch acts (the step's `forkwatch/*` scalars into TRL's metric buffer,
    # an alarm's stop) before the user's own callbacks see the step.
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
    logger.info("forkwatch attached (select=%s, group_js=%s, loss pass read from %s)", config.select,
                capture.group_js_on, "TRL's fused LM head" if loss_path == "fused" else "TRL's logits")
    return callback
