"""`ForkwatchCallback`: the run's lifecycle (writer, run.json, vocab), one `steps` row per optimizer step, and the
`forkwatch/...` scalars in the trainer's own logs. Shaped like TRL's callbacks: it overrides only the events it needs,
only rank 0 writes rows and logs, every hook is guarded, and what it installed is removed at train end.

What runs where at the end of a step: the `steps` row and every scalar it holds are computed on the training thread
and logged for the step they describe. The step's recorded tokens, forks and completions wait in `Pending` until a
hand-off, at the end of a step once `worker_interval_s` (default 1 s) has passed since the last one (so every step
of a run whose steps take longer). A hand-off, on the training thread: the steps rows go to the writer as one batch
and through the live health rules (whose flags `on_log` acts on at once: warning, on_alarm="stop"); the recorded
rows cross to the host (plugin/record_columns.py) and go to the writer as one deferred job, which turns them into
columns and decodes the text on the writer's thread. The `forkwatch/alarm/<kind>` scalars describe the series as of
the last hand-off. Checkpoints, the end of training and `close` (a crash, Ctrl-C) hand off what is pending.
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

from forkwatch.plugin.config import ForkwatchConfig
from forkwatch.plugin.pending import Pending
from forkwatch.plugin.probes import ProbeRunner
from forkwatch.plugin.record_columns import to_host
from forkwatch.plugin.step_row import SELECT_PREFIX, select_means, step_row
from forkwatch.store.health import ALARM_KINDS, LiveMonitor
from forkwatch.store.roles import roles_of
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "forkwatch.json"  # written into each checkpoint folder: the run id a resume continues
LOG_PREFIX = "forkwatch/"  # every scalar forkwatch adds to the trainer's logs


def new_run_id() -> str:
    """A run id when none is given: the local start time, then a short random suffix (two runs started in the same
    second on one log directory do not collide)."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class ForkwatchCallback(TrainerCallback):
    def __init__(self, config: ForkwatchConfig, *, trainer, monitor, install: Callable[[], Callable[[], None]],
                 probes: ProbeRunner | None = None) -> None:
        self.config = config
        self.trainer = trainer
        self.monitor = monitor
        self.probes = probes  # None: probes are off
        self._install = install  # installs the seams; returns their uninstall
        # runtime state
        self.uninstall: Callable[[], None] | None = None
        self.writer = None
        self.run_id: str | None = None
        self.resume_step: int | None = None
        self._resume_run_id: str | None = None
        self._health: LiveMonitor | None = None
        self._alarms: list[Any] = []
        self._alarm_scalars: dict[str, float] = {}
        self._pending = Pending(config.worker_interval_s)
        self._stopped_by_alarm = False
        self._faults_written = 0  # the ledger's total when run.json was last written
        self._rank_faults: dict[int, dict[str, int]] = {}  # rank 0: every rank's fault counts, as last gathered

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
            run_id = new_run_id()
            if acc.num_processes > 1:  # every rank writes into the run rank 0 named
                from accelerate.utils import broadcast_object_list

                run_id = broadcast_object_list([run_id], from_process=0)[0]
        self.run_id = run_id
        self.writer = RunWriter(
            cfg.log_dir, run_id, rank=acc.process_index, world_size=acc.num_processes, meta=self._meta(),
            resume_step=self.resume_step, max_queue_rows=cfg.queue_rows, stat_mantissa_bits=cfg.stat_mantissa_bits,
            ledger=self.monitor.faults,
        )
        if state.is_world_process_zero and self.resume_step is None:
            with self.monitor.faults.guard("vocab"):
                self._write_vocab()
        if self.probes is not None and self.probes.probes is not None and self.resume_step is None:
            with self.monitor.faults.guard("probes"):
                self._score_probes(0)  # the policy before training: what the later scorings are compared with
        self._alarm_scalars = {}
        # the rules were checked at attach (ForkwatchConfig): building the monitor cannot fail on them here
        self._health = LiveMonitor(cfg.health_rules, vocab_size=self._vocab_size())

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        summary: dict[str, Any] = {}
        t0 = time.perf_counter()
        ledger = self.monitor.faults
        with ledger.guard("step_end"):
            acc = self.monitor.take_step(step)
            summary = acc.collect()
            if self.probes is not None:
                with ledger.guard("probes"):
                    self._probe_step(step)
            summary["dropped"] = ledger.total_dropped()
            summary["faults"] = ledger.faults
            summary["rank"] = self.monitor.rank
            self._pending.add(step, acc)
            summary["seconds"] += time.perf_counter() - t0  # forkwatch_seconds covers this hook too
        parts = [summary]
        if self.trainer.accelerator.num_processes > 1:  # always called on every rank, even after a local fault
            from accelerate.utils import gather_object

            parts = gather_object([summary])
        scalars: dict[str, float] = {}
        if state.is_world_process_zero:
            with ledger.guard("step_row"):
                scalars = self._step_row(step, [p for p in parts if p])
        if self._pending.due():
            self._hand_off()
        if scalars:
            with ledger.guard("log"):
                scalars.update(self._alarm_scalars)  # the health rules as of the last hand-off
                metrics = self.trainer._metrics["train"]
                for k, v in scalars.items():
                    metrics[LOG_PREFIX + k].append(v)

    def _step_row(self, step: int, parts: list[dict[str, Any]]) -> dict[str, float]:
        """Rank 0: the step's `steps` row (pending until the next hand-off) and the scalars to log for it, which
        go to TRL's own metric buffer: `log` averages them over the logging window and hands them to log_history and
        every report_to integration, exactly like TRL's `entropy`."""
        if not parts:
            return {}
        for p in parts:
            self._rank_faults[p.get("rank", 0)] = p.get("faults", {})
        selected = select_means(parts)
        row = step_row(step, parts, select_method=self.config.select, selected=selected,
                       dropped=sum(p.get("dropped", 0) for p in parts))
        row["time"] = dt.datetime.now(dt.timezone.utc)
        self._pending.add(step, row=row)
        scalars = {k: float(v) for k, v in row.items() if k not in ("step", "time") and not k.startswith(SELECT_PREFIX)
                   and v is not None and not isinstance(v, list)}
        scalars.update({f"select/{k}": v for k, v in selected.items()})
        scalars["faults"] = float(sum(sum(c.values()) for c in self._rank_faults.values()))
        return scalars

    def _hand_off(self, *, health: bool = True) -> None:
        """Give the pending steps to the writer: their steps rows as one batch (and through the health rules), their
        recorded rows as one deferred job. Training thread; each part guarded on its own, so a fault in one does not
        cost the others."""
        ledger = self.monitor.faults
        records, rows = self._pending.take()
        if rows:
            with ledger.guard("steps_rows"):
                keys = dict.fromkeys(k for r in rows for k in r)
                self.writer.put("steps", {k: [r.get(k) for r in rows] for k in keys})
            if health and self._health is not None:
                with ledger.guard("health"):
                    self._alarms.extend(self._health.update_many(rows))
                    self._alarm_scalars = {f"alarm/{k}": float(v) for k, v in self._health.active_kinds().items()}
        if records:
            with ledger.guard("records"):
                proc = self.trainer.processing_class
                host = to_host(records, rank=self.monitor.rank, tokenizer=getattr(proc, "tokenizer", proc))
                self.writer.submit(host.batches, rows=host.rows, where="records")
        with ledger.guard("meta"):
            self._write_faults()

    def _write_faults(self) -> None:
        """run.json / rank-NNN.json follow the fault counts while the run goes on (rewritten only when they grow)."""
        total = self.monitor.faults.total_faults()
        by_rank = {r: c for r, c in self._rank_faults.items() if c}
        known = sum(sum(c.values()) for c in by_rank.values())
        if total == self._faults_written and known <= self._faults_written:
            return
        self._faults_written = max(total, known)
        fields: dict[str, Any] = {}
        if self.monitor.rank == 0 and by_rank:
            fields["faults_by_rank"] = {str(r): c for r, c in sorted(by_rank.items())}
        self.writer.update_meta(**fields)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        with self.monitor.faults.guard("log"):
            # the flags of the last hand-off (this step's, when it handed off): warn, and stop if asked
            for flag in self._alarms:
                _warn(flag)
                if self.config.on_alarm == "stop" and flag.kind in ALARM_KINDS:
                    control.should_training_stop = True
                    self._stopped_by_alarm = True
                    self.writer.update_meta(stopped_by_alarm=f"{flag.rule} at step {flag.fired_at}: {flag.message}")
            self._alarms.clear()

    def on_save(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        self._hand_off()
        with self.monitor.faults.guard("save"):
            self.writer.flush(timeout=60)  # the records of steps up to this checkpoint are on disk first
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(ckpt):
                with open(os.path.join(ckpt, CHECKPOINT_FILE), "w") as f:
                    json.dump({"run_id": self.run_id, "step": state.global_step}, f)
            if os.path.isdir(ckpt):
                self.monitor.save_select_rng(ckpt)  # every rank: a resume draws the same selections

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self._hand_off()
        for flag in self._alarms:  # the last steps' alarms: warned about, though no log of this run follows
            _warn(flag)
        self._alarms.clear()
        self.close("stopped" if self._stopped_by_alarm else "finished")

    def close(self, status: str) -> None:
        """Remove the seams; flush and close the writer, recording faults and status in run.json. Safe to call
        twice."""
        if self.uninstall is not None:
            uninstall, self.uninstall = self.uninstall, None
            with self.monitor.faults.guard("uninstall"):
                uninstall()
        if self.writer is None:
            return
        if self._pending:  # a crash or Ctrl-C: what is pending is written all the same
            self._hand_off(health=False)
        with self.monitor.faults.guard("meta"):
            self._write_faults()
        writer, self.writer = self.writer, None
        faults = self.monitor.faults.faults
        if faults:
            logger.warning("forkwatch: errors during this run (training was not affected): %s", faults)
        writer.update_meta(group_js_split_groups=self.monitor.split_groups,
                           group_js_fallbacks=dict(self.monitor.group_js_fallbacks),
                           fork_fallbacks=dict(self.monitor.fork_fallbacks))
        writer.close(status)

    # ------------------------------------------------------------------ helpers
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
