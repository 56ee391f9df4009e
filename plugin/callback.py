"""`ForkwatchCallback`: the run's lifecycle (writer, run.json, vocab, probes, checkpoints) and the end of each step.
Shaped like TRL's callbacks: it overrides only the events it needs, only rank 0 logs, every recording step is guarded
(the one error it raises on purpose is a selection that keeps nothing, step after step), and what it installed is
removed at train end.

At the end of a step it takes the step's values from the capture (plugin/capture.py), gathers every rank's summary,
gives both to the `HandOff` (plugin/handoff.py: the steps row, the scalars logged for the step, the hand-off to the
writer) and acts on what comes back: the health flags (a warning in the log, an alert (alert_webhook, sent from the
writer's thread) and, with on_alarm="stop", the end of training at this step) and a selection that kept no token (a
warning naming the selector and the step; training stops with an error after `max_empty_selection_steps` such steps
in a row). TRL's own logged scalars (loss, grad_norm, kl, clip ratios) reach the hand-off in `on_log`. Checkpoints,
the end of training and `close` (a crash, Ctrl-C) hand off what is waiting.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from forkwatch.plugin.capture import Capture
from forkwatch.plugin.config import ForkwatchConfig
from forkwatch.plugin.fork_value import Sampling
from forkwatch.plugin.fork_value_online import OnlineForkValue, recorded_completions
from forkwatch.plugin.handoff import HandOff, is_alarm
from forkwatch.plugin.lenses import ProbeRunner
from forkwatch.plugin.trl_seams import log_scalars, target_model
from forkwatch.store.roles import roles_of
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "forkwatch.json"  # written into each checkpoint folder: the run id a resume continues
LOG_PREFIX = "forkwatch/"  # every scalar forkwatch adds to the trainer's logs


def _trainer_logs_at(args, state) -> bool:
    """Whether the trainer logs this step after its end (transformers' DefaultFlowCallback decides it after our
    on_step_end, which runs first): its steps row then waits for the trainer's own scalars (`on_log`). A wrong guess
    costs little: a row written twice (the last wins) or written at the next hand-off."""
    from transformers.trainer_utils import IntervalStrategy

    every = getattr(state, "logging_steps", 0) or 0
    return bool(args.logging_strategy == IntervalStrategy.STEPS and every > 0 and state.global_step % every == 0
                or state.global_step == 1 and args.logging_first_step)


def new_run_id() -> str:
    """A run id when none is given: the local start time, then a short random suffix (two runs started in the same
    second on one log directory do not collide)."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class ForkwatchCallback(TrainerCallback):
    def __init__(self, config: ForkwatchConfig, *, trainer, capture: Capture, install: Callable[[], Callable[[], None]],
                 probes: ProbeRunner | None = None, loss_path: str = "fused",
                 fork_value: OnlineForkValue | None = None) -> None:
        self.config = config
        self.trainer = trainer
        self.capture = capture
        self.fork_value = fork_value  # None: fork value is not measured during training
        self.loss_path = loss_path  # how the loss pass's values are read on this TRL (plugin/trl_seams.py `check`)
        self.probes = probes  # None: probes are off
        self._install = install  # installs the seams; returns their uninstall
        # runtime state
        self.uninstall: Callable[[], None] | None = None
        self.writer = None
        self.run_id: str | None = None
        self.resume_step: int | None = None
        self._resume_run_id: str | None = None
        self.handoff: HandOff | None = None
        self._stopped_by_alarm = False
        self._faults_written = 0  # the ledger's total when run.json was last written
        self._rank_faults: dict[int, dict[str, int]] = {}  # rank 0: every rank's fault counts, as last gathered
        self.empty_selection_steps: list[int] = []  # steps whose selection kept no token (every rank together)
        self._empty_in_a_row = 0

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> None:
        """Install the seams on the trainer (at attach, and again for a second `train()` after the first ended)."""
        if self.uninstall is None:
            self.uninstall = self._install()

    def prepare_resume(self, checkpoint: str | None) -> None:
        """Called by the `train` wrapper with the checkpoint TRL resumes from (None: a fresh start)."""
        self.resume_step, self._resume_run_id = None, None
        if not checkpoint:
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            self.resume_step = int(json.load(f)["global_step"])
        self.capture.selection_seam.load_rng(checkpoint)
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self._resume_run_id = json.load(f).get("run_id")

    def on_train_begin(self, args, state, control, **kwargs):
        from forkwatch.store import RunWriter

        tr, cfg = self.trainer, self.config
        acc = tr.accelerator
        self.capture.lens_clock.start()  # training time, against which the lenses' time is budgeted, starts now
        run_id = cfg.run_name or self._resume_run_id
        if run_id is None:
            run_id = new_run_id()
            if acc.num_processes > 1:  # every rank writes into the run rank 0 named
                from accelerate.utils import broadcast_object_list

                run_id = broadcast_object_list([run_id], from_process=0)[0]
        self.run_id = run_id
        self.writer = RunWriter(
            cfg.log_dir, run_id, rank=acc.process_index, world_size=acc.num_processes, meta=self._meta(),
            resume_step=self.resume_step, max_queue_rows=cfg.queue_rows, stat_mantissa_bits=cfg.stat_mantissa_bits,
            ledger=self.capture.faults, alert_webhook=cfg.alert_webhook, dashboard_url=cfg.dashboard_url,
        )
        if state.is_world_process_zero and self.resume_step is None:
            with self.capture.faults.guard("vocab"):
                self._write_vocab()
        if self.probes is not None and self.probes.probes is not None and self.resume_step is None:
            with self.capture.faults.guard("probes"):
                self._score_probes(0)  # the policy before training: what the later scorings are compared with
        proc = tr.processing_class
        self.handoff = HandOff(
            self.writer, ledger=self.capture.faults, rank=acc.process_index, tokenizer=getattr(proc, "tokenizer", proc),
            interval_s=cfg.handoff_interval_s, max_rows=cfg.queue_rows, select_method=cfg.select,
            health_rules=cfg.health_rules, vocab_size=self._vocab_size(), stop_on_alarm=cfg.on_alarm == "stop",
        )

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        summary: dict[str, Any] = {}
        t0 = time.perf_counter()
        ledger = self.capture.faults
        acc = None
        with ledger.guard("step_end"):
            acc = self.capture.take_step(step)
            summary = acc.collect()
            if self.probes is not None:
                with ledger.guard("probes"):
                    self._probe_step(step)
            summary["dropped"] = ledger.total_dropped()
            summary["faults"] = ledger.faults
            summary["rank"] = self.capture.rank
            summary["lens_clock"] = self.capture.lens_clock.local()  # the step's time and its lenses' own
            summary["seconds"] += time.perf_counter() - t0  # forkwatch_seconds covers this hook too
        if self.fork_value is not None and self.fork_value.due(step):
            # outside the step's guard: under sharded weights every rank must take part, whatever failed before
            t1 = time.perf_counter()
            with ledger.guard("fork_value"):
                columns = self.fork_value.measure_step(step, recorded_completions(acc) if acc is not None else [])
                if columns is not None:
                    self.writer.put("fork_values", columns)
            if summary:
                summary["seconds"] += time.perf_counter() - t1
        # what the selection kept, outside the recording guard: it decides whether training goes on
        totals = self.capture.selection_seam.take_step(step)
        parts = [summary]
        if self.trainer.accelerator.num_processes > 1:  # always called on every rank, even after a local fault
            from accelerate.utils import gather_object

            parts = gather_object([{**summary, "selection": totals}])
            totals_all = [p["selection"] for p in parts]
            parts = [{k: v for k, v in p.items() if k != "selection"} for p in parts]
        else:
            totals_all = [totals]
        with ledger.guard("lenses"):  # every rank counts the same (gathered) times: the same lenses run next
            clock = self.capture.lens_clock
            clock.agree(p.get("lens_clock") for p in parts)
            if clock.changed and state.is_world_process_zero and self.writer is not None:
                self.writer.update_meta(lenses=clock.meta())  # what ran and what was skipped, as it happens
        scalars: dict[str, float] = {}
        if acc is not None:
            with ledger.guard("step_row"):
                # rank 0 builds the steps row; with on_alarm="stop" every rank does, to stop at the same step
                rows_here = state.is_world_process_zero or self.config.on_alarm == "stop"
                parts = [p for p in parts if p] if rows_here else None
                for p in parts if state.is_world_process_zero else ():
                    self._rank_faults[p.get("rank", 0)] = p.get("faults", {})
                scalars = self.handoff.add(step, acc, parts, log_due=_trainer_logs_at(args, state))
        if self.handoff.due():
            self._act_on(self._hand_off(), control)
        self._check_selection(step, totals_all)  # may raise: after the hand-off, so this step's records are handed over
        if scalars and state.is_world_process_zero:
            with ledger.guard("log"):
                scalars["faults"] = float(sum(sum(c.values()) for c in self._rank_faults.values()))
                if self.config.select is not None:
                    scalars["select/empty_steps"] = float(len(self.empty_selection_steps))
                log_scalars(self.trainer, scalars, LOG_PREFIX)

    def _check_selection(self, step: int, totals: list[tuple[float, float, float] | None]) -> None:
        """Every rank, with every rank's `selection_totals` of `step` (tokens kept, the gradient they carry, the
        gradient the dense step would carry): a step whose selection kept no token, or kept only tokens that carry no
        gradient while the dense step would have, trains on nothing. Counted and warned about (rank 0, with the
        selector and the step); after `max_empty_selection_steps` such steps in a row training stops with an error
        naming the cause, on every rank at once (each saw the same gathered totals)."""
        found = [t for t in totals if t is not None]
        if not found:  # no selector ran at this step (none set, or no loss micro-batch was captured)
            return
        kept, kept_grad, dense_grad = (sum(t[i] for t in found) for i in range(3))
        if kept > 0 and (kept_grad > 0 or dense_grad == 0):  # (every advantage 0: dense GRPO trains on nothing too)
            self._empty_in_a_row = 0
            return
        self.empty_selection_steps.append(step)
        self._empty_in_a_row += 1
        name, limit = self.config.select, self.config.max_empty_selection_steps
        what = ("kept no token" if kept == 0 else
                f"kept {int(kept)} tokens, all of zero gradient weight (zero weight or zero advantage)")
        if self.capture.rank == 0:
            logger.warning("forkwatch: select=%r %s at step %d, which trains on nothing (%d such step(s) so far, %d in "
                           "a row; training stops after %s in a row: max_empty_selection_steps)", name, what, step,
                           len(self.empty_selection_steps), self._empty_in_a_row, limit or "never")
        if limit and self._empty_in_a_row >= limit:
            first = step - self._empty_in_a_row + 1
            message = (f"forkwatch: select={name!r} {what} at {self._empty_in_a_row} steps in a row (steps {first}-"
                       f"{step}): the policy gets no gradient from the selection, so training on is training on "
                       "nothing. The selector's score was 0 (or below its cut-off) for every token that carries "
                       "gradient: for ict against the reference, the policy has not moved from it yet (give it a "
                       "dense warm-up, warmup_steps >= 1); otherwise check the selector's options (fraction, "
                       f"warmup_steps) or use another selector. max_empty_selection_steps={limit} sets how many such "
                       "steps are allowed in a row (0: never stop).")
            if self.writer is not None and self.capture.rank == 0:
                self.writer.update_meta(stopped_by_selection=message, empty_selection_steps=self.empty_selection_steps)
            raise RuntimeError(message)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """TRL's own scalars of the step (loss, grad_norm, kl, clip ratios) join its steps row and the health rules
        (a non-finite loss or gradient norm is an alarm at this step)."""
        if self.handoff is None or not logs:
            return
        with self.capture.faults.guard("trainer_log"):
            self.handoff.trainer_log(state.global_step, logs)
        if self.handoff.due():
            self._act_on(self._hand_off(), control)

    def _hand_off(self, *, health: bool = True, final: bool = False) -> list[Any]:
        """Run the hand-off (plugin/handoff.py), then bring run.json's fault counts up to date; -> health flags."""
        flags = self.handoff.run(health=health, final=final)
        with self.capture.faults.guard("meta"):
            self._write_faults()
        return flags

    def _act_on(self, flags: list[Any], control) -> None:
        """Warn about each new health flag (rank 0); with on_alarm="stop", an alarm ends training at this step (on
        every rank: each evaluated the same rows)."""
        rank0 = self.capture.rank == 0
        with self.capture.faults.guard("alarms"):
            for flag in flags:
                if rank0:
                    logger.warning("forkwatch %s %s", flag.severity, flag.describe())
                    self.writer.alert(flag)  # posted from the writer's thread (alert_webhook), never from here
                if control is not None and self.config.on_alarm == "stop" and is_alarm(flag):
                    control.should_training_stop = True
                    if rank0 and not self._stopped_by_alarm:
                        self.writer.update_meta(stopped_by_alarm=flag.describe())
                    self._stopped_by_alarm = True

    def _write_faults(self) -> None:
        """run.json / rank-NNN.json follow the fault counts while the run goes on (rewritten only when they grow)."""
        total = self.capture.faults.total_faults()
        by_rank = {r: c for r, c in self._rank_faults.items() if c}
        known = sum(sum(c.values()) for c in by_rank.values())
        if total == self._faults_written and known <= self._faults_written:
            return
        self._faults_written = max(total, known)
        fields: dict[str, Any] = {}
        if self.capture.rank == 0 and by_rank:
            fields["faults_by_rank"] = {str(r): c for r, c in sorted(by_rank.items())}
        self.writer.update_meta(**fields)

    def on_save(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        self._act_on(self._hand_off(), control)
        with self.capture.faults.guard("save"):
            self.writer.flush(timeout=60)  # the records of steps up to this checkpoint are on disk first
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(ckpt):
                with open(os.path.join(ckpt, CHECKPOINT_FILE), "w") as f:
                    json.dump({"run_id": self.run_id, "step": state.global_step}, f)
            if os.path.isdir(ckpt):
                self.capture.selection_seam.save_rng(ckpt)  # every rank: a resume draws the same selections

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self._act_on(self._hand_off(final=True), None)  # the last steps' flags: warned; training has ended
        self.close("stopped" if self._stopped_by_alarm else "finished")

    def close(self, status: str) -> None:
        """Remove the seams; flush and close the writer, recording faults and status in run.json. Safe to call
        twice."""
        if self.uninstall is not None:
            uninstall, self.uninstall = self.uninstall, None
            with self.capture.faults.guard("uninstall"):
                uninstall()
        if self.writer is None:
            return
        if self.handoff:  # a crash or Ctrl-C: what is waiting is written all the same
            self._hand_off(health=False, final=True)
        else:
            with self.capture.faults.guard("meta"):
                self._write_faults()
        writer, self.writer = self.writer, None
        faults = self.capture.faults.faults
        if faults:
            logger.warning("forkwatch: errors during this run (training was not affected): %s", faults)
        writer.update_meta(lenses=self.capture.lens_clock.meta())  # the lenses' steps, costs and training time
        evidence = self.capture.evidence
        writer.update_meta(group_js_split_groups=evidence.split_groups,
                           group_js_fallbacks=dict(evidence.group_js_fallbacks),
                           fork_fallbacks=dict(evidence.fork_fallbacks),
                           **({"empty_selection_steps": self.empty_selection_steps} if self.config.select else {}),
                           **({"fork_value": {"positions": self.fork_value.measured,
                                              "consequential": self.fork_value.consequential}}
                              if self.fork_value is not None else {}))
        writer.close(status)

    # ------------------------------------------------------------------ helpers
    def _vocab_size(self) -> int | None:
        return getattr(target_model(self.trainer).config.get_text_config(), "vocab_size", None)

    def _write_vocab(self) -> None:
        """The `vocab` table (token id -> text and role), decoded on the writer's thread: for a 49k vocabulary that
        is about half a second of Python the training thread no longer waits for."""
        proc = self.trainer.processing_class
        tok = getattr(proc, "tokenizer", proc)
        n = len(tok)

        def produce():
            # one id at a time: the tokenizers library's batch decoding would start a thread pool of its own
            texts = [tok.decode([i], skip_special_tokens=False) for i in range(n)]
            return [("vocab", {"token_id": list(range(n)), "text": texts, "role": roles_of(texts)})]

        self.writer.submit(produce, rows={"vocab": n}, where="vocab")

    def _probe_step(self, step: int) -> None:
        """Every rank, at the end of a step: score the probes when due (taking the default probes first if needed)."""
        runner = self.probes
        if not runner.due(step):
            return
        if runner.probes is None and not runner.take_defaults(self.capture.gen):
            return
        self._score_probes(step)

    def _score_probes(self, step: int) -> None:
        """Every rank scores (the forwards are collectives under ZeRO-3 / FSDP2); rank 0 writes the rows, and the
        probes' texts into run.json the first time."""
        first = not self.probes.scored
        columns = self.probes.score(step)
        if self.capture.rank == 0:
            self.writer.put("probes", columns)
            if first:
                self.writer.update_meta(probes=self.probes.meta())

    def _meta(self) -> dict[str, Any]:
        import torch
        import transformers
        import trl

        model = target_model(self.trainer)
        args = self.trainer.args
        return {
            "config": self.config.to_dict(),
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "architectures": getattr(model.config, "architectures", None),
            "vocab_size": self._vocab_size(),
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "group_js": self.capture.group_js_on,
            "loss_pass": self.loss_path,
            # the sampling settings as generation used them (generation_kwargs applied): `forkwatch forkvalue`
            # rolls out with them after training
            "trainer": {**{k: getattr(args, k, None) for k in (
                "loss_type", "beta", "num_generations", "num_iterations", "gradient_accumulation_steps",
                "steps_per_generation", "per_device_train_batch_size", "learning_rate", "seed")},
                **Sampling.settings_of(self.trainer)},
        }

