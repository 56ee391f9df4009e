"""`ForkwatchCallback`: the run's lifecycle (writer, run.json, vocab), one `steps` row per optimizer step, and the
`forkwatch/...` scalars in the trainer's own logs. Shaped like TRL's callbacks (STYLE.md 2).

What runs where at the end of a step (plugin/worker.py): the `steps` row and every scalar it holds are computed on
the training thread and logged for the step they describe. The rest waits in `Pending` until a hand-off, at the end
of a step once `worker_interval_s` (default 1 s) has passed since the last one (so every step of a run whose steps
take longer): then the steps rows go to the writer as one batch, and the record columns (tokens, forks, completions
with their decoded text) and the live health rules run on the worker thread. The health flags of one hand-off are
collected at the next, so an alarm is acted on (warning, on_alarm="stop") one hand-off after the step that raised
it: at the next step with `worker_interval_s=0`. The `forkwatch/alarm/<kind>` scalars describe the series as of the
last collected hand-off. Checkpoints, the end of training and `close` (a crash, Ctrl-C) hand off what is pending.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from typing import Any

from forkwatch.plugin.config import ForkwatchConfig
from forkwatch.plugin.records import completion_columns, fork_columns, step_row, token_columns
from forkwatch.plugin.worker import Job, Pending, StepWorker
from forkwatch.store.roles import roles_of
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "forkwatch.json"  # written into each checkpoint folder: the run id a resume continues
_LOGGED = ("entropy", "renyi2", "group_js")


class ForkwatchCallback(TrainerCallback):
    def __init__(self, config: ForkwatchConfig) -> None:
        self.config = config
        # runtime state, bound by `attach`
        self.trainer = None
        self.monitor = None
        self.probes = None  # a ProbeRunner when probes are on
        self.uninstall = None
        self.writer = None
        self.run_id: str | None = None
        self.resume_step: int | None = None
        self._resume_run_id: str | None = None
        self._health = None
        self._alarms: list[Any] = []
        self._worker: StepWorker | None = None
        self._health_job: Job | None = None  # the last hand-off's health update, collected at the next hand-off
        self._alarm_scalars: dict[str, float] = {}
        self._pending = Pending(config.worker_interval_s)
        self._stopped_by_alarm = False

    # ------------------------------------------------------------------ lifecycle
    def prepare_resume(self, checkpoint: str | None) -> None:
        """Called by the `train` wrapper with the checkpoint TRL resumes from (None: a fresh start)."""
        self.resume_step, self._resume_run_id = None, None
        if not checkpoint:
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            self.resume_step = int(json.load(f)["global_step"])
        self.monitor.load_select_rng(checkpoint)
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self._resume_run_id = json.load(f).get("run_id")

    def on_train_begin(self, args, state, control, **kwargs):
        from forkwatch.store import RunWriter

        tr, cfg = self.trainer, self.config
        acc = tr.accelerator
        run_id = cfg.run_name or self._resume_run_id
        if run_id is None:
            run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            if acc.num_processes > 1:  # every rank writes into the run rank 0 named
                from accelerate.utils import broadcast_object_list

                run_id = broadcast_object_list([run_id], from_process=0)[0]
        self.run_id = run_id
        self.writer = RunWriter(
            cfg.log_dir, run_id, rank=acc.process_index, world_size=acc.num_processes, meta=self._meta(),
            resume_step=self.resume_step, max_queue_rows=cfg.queue_rows, stat_mantissa_bits=cfg.stat_mantissa_bits,
        )
        if state.is_world_process_zero and self.resume_step is None:
            with self.monitor.faults.guard("vocab"):
                self._write_vocab()
        if self.probes is not None and self.probes.probes is not None and self.resume_step is None:
            with self.monitor.faults.guard("probes"):
                self._score_probes(0)  # the policy before training: what the later scorings are compared with
        self._health, self._health_job, self._alarm_scalars = None, None, {}
        if self._worker is None:
            self._worker = StepWorker(self.monitor.faults.guard)
        with self.monitor.faults.guard("health"):
            from forkwatch.store.health import HealthRules, LiveMonitor

            self._health = LiveMonitor(HealthRules(**(cfg.health_rules or {})), vocab_size=self._vocab_size())

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        summary: dict[str, Any] = {}
        t0 = time.perf_counter()
        with self.monitor.faults.guard("step_end"):
            acc = self.monitor.take_step(step)
            summary = acc.collect()
            if self.probes is not None:
                with self.monitor.faults.guard("probes"):
                    self._probe_step(step)
            summary["dropped"] = sum(self.writer.dropped.values())
            self._pending.add(step, acc)
            summary["seconds"] += time.perf_counter() - t0  # forkwatch_seconds covers this hook too
        parts = [summary]
        if self.trainer.accelerator.num_processes > 1:  # always called on every rank, even after a local fault
            from accelerate.utils import gather_object

            parts = gather_object([summary])
        if state.is_world_process_zero:
            with self.monitor.faults.guard("step_row"):
                self._log_step(step, [p for p in parts if p])
        if self._pending.due():
            with self.monitor.faults.guard("hand_off"):
                self._hand_off()

    def _log_step(self, step: int, parts: list[dict[str, Any]]) -> None:
        """Rank 0: the step's `steps` row (queued for the next hand-off) and its scalars in TRL's own metric buffer,
        which `log` averages over the logging window and hands to log_history and every report_to integration,
        exactly like TRL's `entropy`."""
        if not parts:
            return
        dropped = sum(p.get("dropped", 0) for p in parts)
        row = step_row(step, parts, select_method=self.config.select, dropped=dropped)
        select_metrics = row.pop("_select_metrics")
        row["time"] = dt.datetime.now(dt.timezone.utc)
        self._pending.add(step, row=row)
        scalars = {k: float(v) for k, v in row.items() if k not in ("step", "time", "select_method")
                   and v is not None and not isinstance(v, (str, list))}
        scalars.update({f"select/{k}": v for k, v in select_metrics.items()})
        scalars["faults"] = float(sum(self.monitor.faults.counts.values()))
        scalars.update(self._alarm_scalars)  # the health rules as of the last hand-off
        metrics = self.trainer._metrics["train"]
        for k, v in scalars.items():
            metrics[f"forkwatch/{k}"].append(v)

    def _hand_off(self, health: bool = True) -> None:
        """Give the pending steps to the worker: their steps rows to the writer (one batch), their record columns
        and their health update as worker jobs. The previous hand-off's health flags are collected first (normally
        done long since), so an alarm acts one hand-off after the step that raised it."""
        records, rows = self._pending.take()
        if rows:
            self.writer.put("steps", {k: [r[k] for r in rows] for k in rows[0]})
        if records:
            self._worker.submit("records", lambda: self._write_records(records))
        if health and rows and self._health is not None:
            self._collect_health()
            monitor = self._health
            self._health_job = self._worker.submit("health", lambda: (monitor.update_many(rows), monitor.scalars()))

    def _collect_health(self, timeout: float | None = 60.0) -> None:
        """Wait for the previous hand-off's health update (normally done while training went on); keep its flags."""
        job, self._health_job = self._health_job, None
        result = job.result(timeout) if job is not None else None
        if result is not None:
            flags, scalars = result
            self._alarms.extend(flags)
            self._alarm_scalars = {k.removeprefix("forkwatch/"): v for k, v in scalars.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        with self.monitor.faults.guard("log"):
            # --- live health alarms: forkwatch.store.health.LiveMonitor is fed the steps rows at each hand-off
            # (its forkwatch/alarm/<kind> scalars travel with the others); here we act on new flags ---
            for flag in self._alarms:
                _warn(flag)
                if self.config.on_alarm == "stop" and flag.kind in ("collapse", "explosion"):
                    control.should_training_stop = True
                    self._stopped_by_alarm = True
                    self.writer.update_meta(stopped_by_alarm=f"{flag.rule} at step {flag.fired_at}: {flag.message}")
            self._alarms.clear()

    def on_save(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        with self.monitor.faults.guard("hand_off"):
            self._hand_off()
        with self.monitor.faults.guard("save"):
            self._worker.wait(timeout=60)  # the records of steps up to this checkpoint reach the writer first
            self.writer.flush(timeout=60)
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(ckpt):
                with open(os.path.join(ckpt, CHECKPOINT_FILE), "w") as f:
                    json.dump({"run_id": self.run_id, "step": state.global_step}, f)
            if os.path.isdir(ckpt):
                self.monitor.save_select_rng(ckpt)  # every rank: a resume draws the same selections

    def on_train_end(self, args, state, control, **kwargs):
        with self.monitor.faults.guard("hand_off"):
            self._hand_off()
        if self._health_job is not None:
            self._collect_health()  # the last steps' alarms: warned about, though no log of this run follows
            for flag in self._alarms:
                _warn(flag)
            self._alarms.clear()
        self.close("stopped" if self._stopped_by_alarm else "finished")

    def close(self, status: str) -> None:
        """Flush and close the writer, recording faults and status in run.json. Safe to call twice."""
        if self.writer is None:
            return
        if self._pending and self._worker is not None:  # a crash or Ctrl-C: what is pending is written all the same
            with self.monitor.faults.guard("hand_off"):
                self._hand_off(health=False)
        if self._worker is not None:  # its queued records go to the writer before the writer closes
            self._worker.close()
            self._worker = None
        writer, self.writer = self.writer, None
        faults = dict(self.monitor.faults.counts)
        if faults:
            logger.warning("forkwatch: hook errors during this run (training was not affected): %s", faults)
        writer.update_meta(faults=faults, group_js_split_groups=self.monitor.split_groups,
                           group_js_fallbacks=dict(self.monitor.group_js_fallbacks))
        writer.close(status)

    # ------------------------------------------------------------------ helpers
    def _write_records(self, records: list[tuple[int, Any]]) -> None:
        """Worker thread: the record columns (and completion text) of the handed-over steps to the writer."""
        w, rank = self.writer, self.monitor.rank
        if w is None:
            return
        proc = self.trainer.processing_class

        def of(field: str) -> list[tuple[int, Any]]:
            return [(step, getattr(acc, field)) for step, acc in records if getattr(acc, field)]

        if steps := of("completions"):
            w.put("completions", completion_columns(steps, rank, getattr(proc, "tokenizer", proc)))
        if steps := of("tokens"):
            w.put("tokens", token_columns(steps))
        if steps := of("forks"):
            w.put("forks", fork_columns(steps))

    def _vocab_size(self) -> int | None:
        from forkwatch.plugin.hooks import target_model

        return getattr(target_model(self.trainer).config.get_text_config(), "vocab_size", None)

    def _write_vocab(self) -> None:
        proc = self.trainer.processing_class
        tok = getattr(proc, "tokenizer", proc)
        n = len(tok)
        texts = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        self.writer.put("vocab", {"token_id": list(range(n)), "text": texts, "role": roles_of(texts)})

    def _probe_step(self, step: int) -> None:
        """Every rank, at the end of a step: score the probes when due (taking the default probes first if needed)."""
        runner = self.probes
        if not runner.due(step):
            return
        if runner.probes is None and not runner.take_defaults(self.monitor.gen):
            return
        self._score_probes(step)

    def _score_probes(self, step: int) -> None:
        """Every rank scores (the forwards are collectives under ZeRO-3 / FSDP2); rank 0 writes the rows, and the
        probes' texts into run.json the first time."""
        first = not self.probes.scored
        columns = self.probes.score(step)
        if self.monitor.rank == 0:
            self.writer.put("probes", columns)
            if first:
                self.writer.update_meta(probes=self.probes.meta())

    def _meta(self) -> dict[str, Any]:
        import torch
        import transformers
        import trl
        from forkwatch.plugin.hooks import target_model

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
            "group_js": self.monitor.group_js_on,
            "trainer": {k: getattr(args, k, None) for k in (
                "loss_type", "beta", "num_generations", "num_iterations", "gradient_accumulation_steps",
                "steps_per_generation", "per_device_train_batch_size", "temperature", "max_completion_length",
                "learning_rate", "seed")},
        }


def _warn(flag) -> None:
    """A health flag as a person reads it: the rule, the step it fired at, and the rule's own account."""
    logger.warning("forkwatch alarm %s at step %s: %s", flag.rule, flag.fired_at, flag.message)
