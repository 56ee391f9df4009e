"""`forkwatch forkvalue`: the fork value of a recorded run's positions, measured after training on a saved
checkpoint, written into the run's `fork_values` table by the store's writer.

What the run recorded gives everything but the policy and the reward: the completions' tokens (`tokens`), their
prompts' text (`completions`), the alternatives stored at forks (`forks`), the sampling temperature and length limit
(run.json's "trainer"), and on the demo the role of every token (`truth`). Per step, a stratified sample of the
recorded positions (plugin/fork_value_stats.py) is measured with the checkpoint (plugin/fork_value.py) and written by a
`RunWriter` of its own rank (`OFFLINE_RANK`), so that run.json, training's counts and training's parts are never
touched. What a run did not record cannot be passed to the reward functions: a prompt's extra dataset columns.

Prompts are rebuilt from their stored text the way GRPOTrainer tokenised them: plain text with the tokenizer; a chat
prompt (the text the chat template rendered, special tokens dropped) as one user message through the template. Either
way the rebuilt tokens must decode back to the stored text, or the run is refused with the reason.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import logging
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from forkwatch.plugin.fork_value import (
    Cost,
    ForkValueSettings,
    Measurement,
    Position,
    RewardFunctions,
    Sampling,
    measure,
)
from forkwatch.plugin.fork_value_stats import strata_of, stratified_sample

logger = logging.getLogger(__name__)

# The writer rank of offline measurements: far above any training rank, so its parts (part-r900-...) and its
# rank-900.json never collide with training's, and run.json (rank 0's) is left alone.
OFFLINE_RANK = 900
# Stand-ins for a message's content while reading the chat template's frame: the first the tokenizer round-trips
_SENTINELS = ("\x00forkwatch-prompt\x00", "QZXJQZXJ", "qzxjqzxj")


class ForkValueRunError(ValueError):
    """Input `forkwatch forkvalue` cannot use; the message names what is wrong and the fix."""


@dataclass
class StepResult:
    step: int
    positions: int
    population: int  # recorded positions of the step
    strata: dict[str, int]  # measured positions per stratum
    consequential: int
    measurement: Measurement
    top: list[dict[str, Any]] = field(default_factory=list)  # the highest-valued positions, with their text


@dataclass
class RunResult:
    run_id: str
    source: str
    measurement_id: str
    sampling: Sampling
    sampling_from: dict[str, str]  # setting -> "run.json" | "--sampling" | "default"
    steps: list[StepResult] = field(default_factory=list)
    reward_mismatches: tuple[int, int] = (0, 0)  # (recorded completions whose reward was not reproduced, checked)
    rows_written: int = 0

    @property
    def cost(self) -> Cost:
        total = Cost()
        for s in self.steps:
            for name, value in vars(s.measurement.cost).items():
                setattr(total, name, getattr(total, name) + value)
        return total


def load_reward(spec: str) -> Callable:
    """`module:function` (or `path/to/file.py:function`) -> the function; ForkValueRunError naming what failed."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ForkValueRunError(f"--reward {spec!r}: give module:function, e.g. forkwatch.demo.task:reward_fn")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ForkValueRunError(f"--reward {spec!r}: no such file {module_name}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules.setdefault(path.stem, module)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ForkValueRunError:
        raise
    except Exception as e:  # the user's module: any error while importing it is theirs to see
        raise ForkValueRunError(f"--reward {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    func = getattr(module, attr, None)
    if func is None:
        raise ForkValueRunError(f"--reward {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(func):
        raise ForkValueRunError(f"--reward {spec!r}: {module_name}.{attr} is not callable")
    return func


def load_checkpoint(path: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer saved in `path` (a `save_pretrained` folder). A tokenizer.json is loaded as a fast
    tokenizer directly (AutoTokenizer would turn a character-level one into a byte-level one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    if not folder.is_dir():
        raise ForkValueRunError(f"--model {path}: no such checkpoint folder (pass a folder written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise ForkValueRunError(f"--model {path}: no config.json there (pass a folder written by save_pretrained)")
    try:
        tok = (PreTrainedTokenizerFast.from_pretrained(folder) if (folder / "tokenizer.json").is_file()
               else AutoTokenizer.from_pretrained(folder))
        model = AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ForkValueRunError(f"--model {path}: cannot load it: {e}") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok


def rebuild_prompt(text: str, tokenizer: Any) -> tuple[tuple[int, ...], Any]:
    """(prompt tokens as generation saw them, the prompt as reward functions got it) from a stored prompt text."""
    template = getattr(tokenizer, "chat_template", None)
    sentinel = next((s for s in _SENTINELS if tokenizer.decode(tokenizer(s, add_special_tokens=False)["input_ids"],
                                                                skip_special_tokens=True) == s), None)
    if template and sentinel is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        shown = tokenizer.decode(_flat(rendered), skip_special_tokens=True)
        head, _, tail = shown.partition(sentinel)
        if shown.count(sentinel) == 1 and text.startswith(head) and text.endswith(tail) \
                and len(text) >= len(head) + len(tail):
            messages = [{"role": "user", "content": text[len(head): len(text) - len(tail)]}]
            ids = _flat(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
            if tokenizer.decode(ids, skip_special_tokens=True) == text:
                return tuple(ids), messages
    ids = tokenizer(text=text)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True) != text:
        raise ForkValueRunError(f"cannot rebuild the prompt tokens of {text[:60]!r} from its stored text with this "
                                "tokenizer (a chat prompt of several messages, or another tokenizer): measure it "
                                "during training instead")
    return tuple(ids), text


def _flat(ids: Any) -> list[int]:
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)


def _strata(rows: Any, has_truth: bool) -> np.ndarray:
    """Stratum of each recorded position of one step (`strata_of`): its role on a run with a ground truth, fork or
    not, kept or dropped by the selector."""
    role = rows["role"].fillna("unknown").astype(str).to_numpy(object) if has_truth else None
    return strata_of(rows["is_fork"].fillna(False).to_numpy(bool), rows["selected"].to_numpy(np.float64, na_value=1.0),
                     role)


def measure_run(log_dir: str, run: str, *, checkpoint: str | Path, rewards: Sequence[str],
                reward_weights: Sequence[float] | None = None, steps: Sequence[int] | None = None,
                positions: int = 64, settings: ForkValueSettings | None = None, seed: int = 0,
                sampling: Mapping[str, Any] | None = None, device: str | None = None,
                on_rollouts: Callable[[int], None] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> RunResult:
    """Measure `positions` positions per step (default: the run's last recorded step) and write them. `rewards`:
    module:function specs; `sampling`: GRPOConfig-named settings overriding run.json's; `on_step(step, rollouts)` is
    called before each step's measurement, `on_rollouts(n)` after every n rollouts."""
    from forkwatch.store import RunWriter, connect, run_folder, run_meta
    from forkwatch.store.location import resolve

    settings = settings or ForkValueSettings()
    loc = resolve(log_dir)
    if run not in run_folder.run_dirs(loc):
        raise ForkValueRunError(f"no run {run!r} in {log_dir} (a run is a folder with a run.json)")
    funcs = [load_reward(s) for s in rewards]
    try:
        reward_fns = RewardFunctions.of(funcs, reward_weights)
    except ValueError as e:
        raise ForkValueRunError(str(e)) from None
    con = connect(log_dir)
    recorded = con.execute("SELECT DISTINCT step FROM tokens WHERE run_id = ? ORDER BY step", [run]).fetchall()
    if not recorded:
        raise ForkValueRunError(f"run {run!r} has no recorded tokens: fork value needs the completions' tokens "
                                "(train with record_tokens=True, forkwatch's default)")
    recorded_steps = [r[0] for r in recorded]
    steps = list(steps) if steps else [recorded_steps[-1]]
    missing = sorted(set(steps) - set(recorded_steps))
    if missing:
        raise ForkValueRunError(f"run {run!r} recorded no tokens at step(s) {missing}; recorded steps: "
                                f"{recorded_steps[0]}..{recorded_steps[-1]} ({len(recorded_steps)} steps)")
    meta = run_meta.read_run_json(loc, run)
    trainer_meta = meta.get("trainer") or {}
    model, tok = load_checkpoint(checkpoint, device)
    chosen: dict[str, Any] = {}
    sampling_from: dict[str, str] = {}
    for name in Sampling.KNOWN:
        if sampling and name in sampling:
            chosen[name], sampling_from[name] = sampling[name], "--sampling"
        elif trainer_meta.get(name) is not None:
            chosen[name], sampling_from[name] = trainer_meta[name], "run.json"
        else:
            sampling_from[name] = "default"
    try:
        samp = Sampling.from_settings(chosen, model=model, tokenizer=tok)
    except ValueError as e:
        raise ForkValueRunError(f"--sampling: {e}") from None
    has_truth = bool(con.execute("SELECT count(*) FROM truth WHERE run_id = ?", [run]).fetchone()[0])
    now = dt.datetime.now(dt.timezone.utc)
    result = RunResult(run_id=run, source=str(checkpoint), sampling=samp, sampling_from=sampling_from,
                       measurement_id=f"{now:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:6]}")
    prompts: dict[str, tuple[tuple[int, ...], Any]] = {}
    batches = []
    for step in steps:
        rows = con.execute(
            "SELECT t.completion_id, t.position, t.token_id, t.is_fork, t.selected, c.prompt, c.completion, "
            "c.reward, "
            + ("x.role " if has_truth else "NULL AS role ")
            + "FROM tokens t JOIN completions c USING (run_id, step, completion_id) "
            + ("LEFT JOIN truth x USING (run_id, step, completion_id, position) " if has_truth else "")
            + "WHERE t.run_id = ? AND t.step = ? ORDER BY t.completion_id, t.position", [run, step]).df()
        forks = con.execute("SELECT completion_id, position, alt_token_ids FROM forks WHERE run_id = ? AND step = ?",
                            [run, step]).df()
        stored = {(int(r.completion_id), int(r.position)): tuple(int(a) for a in r.alt_token_ids)
                  for r in forks.itertuples(index=False) if r.alt_token_ids is not None}
        ids_of = {int(cid): tuple(g["token_id"].astype(int)) for cid, g in rows.groupby("completion_id", sort=False)}
        first = rows.drop_duplicates("completion_id")
        _check_tokenizer(tok, first, ids_of)
        for text in first["prompt"]:
            if text not in prompts:
                prompts[text] = rebuild_prompt(text, tok)
        mismatched = _check_rewards(reward_fns, first, ids_of, prompts, step)
        result.reward_mismatches = (result.reward_mismatches[0] + mismatched, result.reward_mismatches[1] + len(first))
        strata = _strata(rows, has_truth)
        idx, inclusion = stratified_sample(strata, positions, np.random.default_rng([seed, step]))
        chosen_positions = []
        for i, p in zip(idx.tolist(), inclusion.tolist(), strict=True):
            r = rows.iloc[i]
            cid, pos = int(r.completion_id), int(r.position)
            prompt_ids, prompt = prompts[r.prompt]
            chosen_positions.append(Position(prompt_ids=prompt_ids, completion_ids=ids_of[cid], position=pos,
                                             prompt=prompt, alternatives=stored.get((cid, pos)), step=int(step),
                                             completion_id=cid, stratum=str(strata[i]), inclusion_prob=float(p)))
        batches.append((int(step), len(rows), chosen_positions))
    con.close()
    from transformers import TrainerState

    writer = RunWriter(log_dir, run, rank=OFFLINE_RANK, world_size=1)
    try:
        for step, population, chosen_positions in batches:
            if on_step is not None:
                on_step(step, len(chosen_positions) * (settings.branches + 2) * settings.rollouts)
            m = measure(model, tok, chosen_positions, sampling=samp, rewards=reward_fns, settings=settings,
                        seed=int(np.random.SeedSequence([seed, step]).generate_state(1)[0]),
                        state=TrainerState(global_step=step), on_rollouts=on_rollouts)
            n_rows = len(m.columns["step"])
            if n_rows:
                writer.put("fork_values", {**m.columns, "source": np.full(n_rows, result.source, dtype=object),
                                           "measurement": np.full(n_rows, result.measurement_id, dtype=object)})
            result.rows_written += n_rows
            result.steps.append(StepResult(
                step=step, positions=len(chosen_positions), population=population,
                strata={s: sum(p.stratum == s for p in chosen_positions) for s in sorted({p.stratum for p in
                                                                                            chosen_positions})},
                consequential=sum(e.consequential for e in m.estimates), measurement=m,
                top=_top(tok, chosen_positions, m)))
    finally:
        writer.close()
    if writer.dropped.get("fork_values"):
        raise ForkValueRunError(f"{writer.dropped['fork_values']} fork_values rows could not be written to "
                                f"{log_dir}/{run} (see the warnings above)")
    return result


def _top(tok: Any, chosen: Sequence[Position], m: Measurement, n: int = 3) -> list[dict[str, Any]]:
    """The `n` highest-valued positions: where, the text up to the token, the value and the sampled token's Q − V."""
    order = sorted(range(len(chosen)), key=lambda i: -m.estimates[i].value)[:n]
    out = []
    for i in order:
        p, e = chosen[i], m.estimates[i]
        out.append({"completion_id": p.completion_id, "position": p.position, "value": e.value,
                    "value_se": e.value_se, "advantage": e.sampled_advantage,
                    "token": tok.decode([p.completion_ids[p.position]]),
                    "context": tok.decode(list(p.completion_ids[max(0, p.position - 24): p.position + 1]),
                                          skip_special_tokens=True)})
    return out


def _check_tokenizer(tok: Any, first: Any, ids_of: Mapping[int, tuple[int, ...]]) -> None:
    """The checkpoint's tokenizer must decode the run's recorded tokens into the recorded completion text."""
    r = first.iloc[0]
    shown = tok.decode(list(ids_of[int(r.completion_id)]), skip_special_tokens=True)
    if r.completion is not None and shown != r.completion:
        raise ForkValueRunError(f"the checkpoint's tokenizer decodes the run's tokens as {shown[:40]!r}, but the run "
                                f"recorded {r.completion[:40]!r}: pass the checkpoint of this run's model")


def _check_rewards(rewards: RewardFunctions, first: Any, ids_of: Mapping[int, tuple[int, ...]],
                   prompts: Mapping[str, tuple[tuple[int, ...], Any]], step: int) -> int:
    """Score the recorded completions with the given reward functions: how many differ from the recorded reward
    (a reward that needs a dataset column the run did not record is refused here, naming the column)."""
    from transformers import TrainerState
    from trl.data_utils import is_conversational

    prompt_objs = [prompts[t][1] for t in first["prompt"]]
    texts = [c or "" for c in first["completion"]]
    completions = [[{"role": "assistant", "content": t}] for t in texts] \
        if is_conversational({"prompt": prompt_objs[0]}) else texts
    try:
        got = rewards.score(prompt_objs, completions, [list(ids_of[int(c)]) for c in first["completion_id"]], {},
                            TrainerState(global_step=step))
    except TypeError as e:
        raise ForkValueRunError(f"a reward function failed on the recorded completions: {e} (the run did not record "
                                "the prompts' extra dataset columns: wrap the function to derive them from the "
                                "prompt)") from e
    want = first["reward"].to_numpy(np.float64)
    ok = np.isclose(got, want, rtol=1e-3, atol=1e-4) | np.isnan(want)
    return int((~ok).sum())
