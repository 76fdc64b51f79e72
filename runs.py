"""A training run's set-up and bookkeeping, around the loop in mezo.train: the data, the model and
its tokenised splits; which examples each step sees; evaluation; checkpoints, resume and the stop on
a non-finite loss; log.jsonl, the progress bar, timing, peak memory and summary.json.

mezo.train calls `load` (data, model, prompt), picks the trainable tensors, and hands `Run` values:
what load gave, the tensors, the forward and the loss of a batch's logits. The tensors are read by
attribute only (name, tensor, offset, decay, full_shape, shard_start), and nothing here calls back
into mezo or imports it. A step's loss comes from `Run.loss_fn(step)`: a forward on the step's
batch, or in a --replay the logged L± (ReplayMixin), so the loop and mezo_step are the same in both.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: FolderLock takes msvcrt's lock instead
    fcntl = None

from . import checkpoints, models, options, tasks
from .baseline import adam_state, restore_adam_state
from .errors import NonFiniteLoss, Stopped, UsageError
from .tasks.prompts import batch_logits, check_template, encode_splits, label_tokens, micro_batches


class ReplayMixin:
    """--replay RUN_DIR --out NEW_DIR [--steps T]: the run's trainable tensors after step T rebuilt
    from its start (the model, the run seed) and its log alone. mezo_step runs as in training, on
    the logged losses instead of forwards, so it takes the run's projected gradients, perturbations
    and roundings: bit for bit the tensors the run had, on the same backend. A few dozen bytes of
    log a step stand in for a checkpoint of the whole model."""

    def _read_replay(self) -> dict:
        cfg, folder = self.cfg, Path(self.cfg.replay)
        if not cfg.out or Path(cfg.out).resolve() == folder.resolve():
            raise UsageError(f"--replay {folder} needs --out NEW_DIR, another folder: the run's "
                             "own files are kept")
        if cfg.optimizer != "mezo":
            raise UsageError(f"--replay {folder}: a first-order run's steps need its gradients, "
                             "which its log does not keep; only MeZO runs replay")
        if not (folder / "log.jsonl").is_file():
            raise UsageError(f"--replay {folder}: no log.jsonl there; point --replay at a run's "
                             "--out folder")
        records = {r["step"]: r for r in read_log(folder / "log.jsonl") if "projected_grad" in r}
        missing = next((t for t in range(1, cfg.steps + 1) if t not in records), None)
        if missing is not None:
            raise UsageError(f"--replay {folder}: log.jsonl has no record of step {missing} (it "
                             f"holds steps up to {max(records, default=0)}); replay to --steps "
                             f"{missing - 1} at most")
        return {t: records[t] for t in range(1, cfg.steps + 1)}

    def _read_tail(self, folder: str, start: int, saved: dict) -> tuple[dict, dict]:
        """--resume of a run killed between checkpoints (kill -9, out of memory, a lost machine):
        the steps its log holds past the checkpoint's, rebuilt as --replay rebuilds them (their
        logged L±, no forward) rather than run again. Only where they are this resume's own steps:
        MeZO, one process, none of the step's flags changed since the checkpoint (SAME_STEPS), and
        each record's lr, directions and projected_grad those of this --lr, --n-samples and --eps
        (a resume with a lower --lr or --eps runs them again). All of them, from start + 1 on:
        _rebuilds cuts them where an evaluation is due that the log does not hold. With them, the
        log's evaluations: {step: {split: accuracy}}, as a resume from a checkpoint keeps them."""
        cfg, path = self.cfg, Path(folder) / "log.jsonl"
        if (cfg.optimizer != "mezo" or cfg.replay or not path.is_file() or distributed(cfg)
                or any(changed(cfg, saved, SAME_STEPS))):
            return {}, {}
        records, evals = read_log(path), {}
        for r in records:
            if "split" in r:
                evals.setdefault(r["step"], {})[r["split"]] = r["accuracy"]
        logged = {r["step"]: r for r in records if "projected_grad" in r}
        tail, t = {}, start + 1
        while t in logged:
            samples = logged[t].get("samples") or [logged[t]]
            if not (logged[t]["lr"] == cfg.lr and len(samples) == cfg.n_samples) or any(
                    (s["loss_plus"] - s["loss_minus"]) / (2 * cfg.eps) != s["projected_grad"]
                    for s in samples):
                break
            tail[t], t = logged[t], t + 1
        return tail, evals

    def _rebuilds(self, folder: str, start: int, saved: dict) -> dict:
        """The steps a resume from `start` rebuilds from the log (_read_tail), up to the first that
        evaluates where the log holds no whole evaluation (dev and test) of that step: a logged one
        is kept, not run again (a run folder whose checkpoint is gone, its log and run.json kept,
        is rebuilt to its last step). A log that holds more steps than --steps asks for is
        refused, as a checkpoint past it is: the resume would drop them."""
        tail, evals = self._read_tail(folder, start, saved) if start < self.cfg.steps else ({}, {})
        if tail and max(tail) > self.cfg.steps:
            last, steps = max(tail), self.cfg.steps
            raise UsageError(f"--resume {folder} --steps {steps}: its log holds steps up to "
                             f"{last}, which a resume rebuilds and goes on from: give --steps "
                             f"{last} or more (step {steps}'s tensors: --replay "
                             f"{shlex.quote(str(folder))} --out NEW_DIR --steps {steps})")
        cut = next((t for t in tail if self.evaluates_at(t) and not {"dev", "test"} <= evals.get(
            t, {}).keys()), max(tail, default=start) + 1)
        self.logged_evals = {t: evals[t] for t in tail if t < cut and self.evaluates_at(t)}
        return {t: r for t, r in tail.items() if t < cut}

    def replayed(self, step: int):
        """The logged losses of a step, in the order mezo_step asks for them (L+, L− of each
        sample)."""
        record = self.tail.get(step) or self.replay[step]
        losses = iter([v for s in record.get("samples") or [record]
                       for v in (s["loss_plus"], s["loss_minus"])]
                      + record.get("candidate_losses", []))  # --rule conservative's three more
        return lambda: next(losses)

    def _check_replayed(self, step: int, record: dict) -> None:
        logged = self.tail.get(step) or self.replay[step]
        keys = ("seed", "projected_grad", "lr")
        if any(logged.get(k) != record.get(k) for k in keys):
            got = {k: (logged.get(k), record.get(k)) for k in keys
                   if logged.get(k) != record.get(k)}
            flag = f"--replay {self.cfg.replay}" if self.replay is not None else "--resume"
            raise UsageError(f"{flag}: step {step}'s record does not match its "
                             f"own replay ({got}, logged vs replayed): the log was edited, or the "
                             "run had another --seed, --eps or --lr")

    def _check_against_the_runs_checkpoint(self) -> bool:
        """Where the run saved a checkpoint at the step replayed to, the replay must equal it bit
        for bit (True: it was compared)."""
        folder = Path(self.cfg.replay)
        if not (folder / checkpoints.CHECKPOINT).is_file():
            return False
        tensors, step, _ = checkpoints.read_checkpoint(folder, "--replay")
        # and buffers
        mine = {p.name: p.tensor for p in self.placement.gather(self.params)} | self._rule_state()
        if step == self.cfg.steps and any(k not in tensors
                                          or not torch.equal(tensors[k], t.detach().cpu())
                                          for k, t in mine.items()):
            raise UsageError(f"--replay {folder}: the rebuilt tensors differ from the run's own "
                             f"checkpoint at step {step}: another model or backend than the run's "
                             "(--fast on a GPU is Triton's numbers), or an edited log")
        return step == self.cfg.steps


@dataclasses.dataclass
class Loaded:
    """What a run starts from (load): the model on its device, and the task's data and prompt."""
    model: torch.nn.Module
    device: torch.device
    model_path: str
    tokenizer: object
    data: dict
    template: str
    words: list[str]
    kind: str  # "mlm" or "causal": where the prompt is read
    candidates: list | None  # each label word's token ids (--head prompt)
    label_ids: list[int]  # one id per word, when every word is one token; else []
    # tasks.fingerprint of the splits and the folder they came from (absolute): kept in each
    # checkpoint, what a resume checks its data against
    fingerprint: dict


def load(cfg, placement, resume: str | None = None) -> Loaded:
    """The task's data, the model (with --head cls's fresh head) and the prompt, as a config asks;
    --out is made first, so a folder that cannot be written, that another run writes, or that
    holds a run a fresh one would replace is refused before anything loads (Run checks again,
    under its lock). So is a --resume or --replay with a setting the run was not trained with."""
    if resume and cfg.overwrite and not cfg.replay:  # (a replay from a checkpoint: keep_last_good)
        raise UsageError("--overwrite starts a run afresh and --resume goes on with one: drop one "
                         "of them")
    for flag, folder in (("--resume", resume), ("--replay", cfg.replay)):
        if folder and (Path(folder) / checkpoints.CHECKPOINT).is_file():
            check_same_run(cfg, checkpoints.saved_config(Path(folder), flag), flag, folder)
    if cfg.out and placement.is_main and not cfg.replay:
        out = Path(cfg.out)
        made = make_out(out, cfg.out)  # (it can be made: checked before anything loads)
        fresh = fresh_into(out, resume)
        FolderLock.ask(out, cfg.out, "--out" if fresh else "--resume")
        if fresh and not cfg.overwrite:
            claim(out, False, "--out", locked=True)  # (refuses; removes nothing)
        for folder in made:  # made again as the run starts: a refusal before leaves none empty
            with contextlib.suppress(OSError):
                folder.rmdir()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    # the data a checkpoint's run trained on: where it came from, and its fingerprint
    trained = resume or cfg.replay
    saved = (checkpoints.saved_data(Path(trained))
             if trained and (Path(trained) / checkpoints.CHECKPOINT).is_file() else {})
    data_dir = cfg.data_dir
    if data_dir is None and not os.environ.get("MEZO_DATA") and saved.get("root") and (
            Path(saved["root"]).is_dir()):  # e.g. a run started under a $MEZO_DATA unset since
        data_dir = saved["root"]
    data = tasks.load(cfg.task, cfg.k, cfg.data_seed, data_dir)
    if data["root"] is not None:
        print(f"mezo: data from {data['root']}" + (" (the run's)" if data_dir != cfg.data_dir
                                                   else ""))
    root = data["root"]
    fingerprint = tasks.fingerprint(data) | {"root": str(Path(root).absolute()) if root else None}
    if resume and saved:
        check_same_data(resume, saved, fingerprint)
    device = placement.device or torch.device(models.resolve_device(cfg.device))
    model, tokenizer, source, model_path = models.load_model(cfg.model, cfg.dtype, cfg.head)
    model.to(device)
    kind = models.model_kind(model)
    print(f"mezo: model {source}: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.dtype}, {device}")
    note = precision_note(cfg.dtype, cfg.eps) if cfg.optimizer == "mezo" else None
    notes = ([note] if note else []) + idle_flags(cfg)
    for line in notes if placement.is_main else ():
        print(f"mezo: note: {line}")
    # a body without an LM head (--head cls) reads its last token
    kind = "mlm" if kind == "mlm" else "causal"
    # the task's, unless --template / --label-words say
    default, words = tasks.prompt(cfg.task, kind)
    template, words = cfg.template or default, cfg.label_words or words
    if kind == "causal":
        tasks.prompts.check_causal_template(template, default)
    if cfg.head == "prompt" and kind == "mlm" and "{mask}" not in template:
        raise UsageError(f"a masked LM needs {{mask}} in --template, got {template!r}")
    if cfg.head == "cls":
        models.add_cls_head(model, len(words), cfg.seed)
    candidates = label_tokens(tokenizer, words, kind) if cfg.head == "prompt" else None
    label_ids = ([c[0] for c in candidates]
                 if candidates and all(len(c) == 1 for c in candidates) else [])
    return Loaded(model, device, model_path, tokenizer, data, template, words, kind, candidates,
                  label_ids, fingerprint)


def check_same_data(folder, saved: dict, now: dict) -> None:
    """The splits a resume found (now: Loaded.fingerprint) are the ones its checkpoint's run
    trained on (saved: the same, kept in the checkpoint; {} from one that predates it): one line
    if not."""
    split = next((name for name in ("train", "dev", "test")
                  if name in saved and saved[name] != now[name]), None)
    if split:
        now_from = now["root"] or "generated"
        was_from = saved.get("root") or "generated"
        fix = ("its files changed since the run read them: put them back as they were" if
               now_from == was_from else f"the run's data came from {was_from}: give --data-dir "
               "(or $MEZO_DATA) that folder")
        raise UsageError(f"--resume {folder}: the {split} set found now (data from {now_from}) is "
                         f"not the one the run was trained on; {fix}")


def make_out(folder: Path, shown, flag: str = "--out", what: str = "for the run") -> list[Path]:
    """Make folder (and its missing parents); return the folders made, the deepest first."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {shown} is a file, not a folder; give a folder {what} (nothing "
                         "was changed)")
    made = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot create it ({e.strerror}); "
                         "pick a folder you can write to") from None
    return made


class StepLoss:
    """A step's loss at θ on its examples. Called: the objective as a float, averaged over
    data-parallel ranks so all see one loss (MeZO's forward). parts(): the cross-entropy as
    differentiable micro-batch parts (the first-order baseline's forward and backward)."""

    def __init__(self, run: Run, batch: list[dict]):
        self.run, self.batch = run, batch

    def __call__(self) -> float:
        run = self.run
        return run.placement.mean(run.objective(*run.logits(self.batch), run.cfg.objective),
                                  len(self.batch))

    def parts(self):
        return self.run.loss_parts(self.batch)


class Run(ReplayMixin):
    """Everything a run keeps besides θ's trajectory. Made by mezo.train from values: what load()
    gave, this process's trainable tensors, the forward, the loss of a batch's logits
    (objective(logits, labels, name)), the first-order baseline's torch optimizer (or None) and the
    update rule; see train's loop for the order of calls."""

    def __init__(self, cfg, placement, loaded: Loaded, params: list, forward, objective,
                 optimizer=None, rule=None):
        self.cfg, self.placement, self.rule, self.objective = cfg, placement, rule, objective
        self.params, self.forward, self.optimizer = params, forward, optimizer
        self.model, self.device, self.model_path = loaded.model, loaded.device, loaded.model_path
        self.data = loaded.fingerprint  # (kept in each checkpoint)
        self.out = Path(cfg.out) if cfg.out else None
        # --replay: the folder moved into place at the end; out's lock
        self.into, self.lock = None, None
        self.stop = StopOnSignal()  # Ctrl-C or SIGTERM: finish the step, checkpoint, stop
        # a replay writes beside --out and moves there once it has checked itself
        if self.out and cfg.replay:
            self.into, self.out = self.out, self.out.with_name(f".{self.out.name}.replay")
        print(f"mezo: training {sum(math.prod(p.full_shape) for p in params):,} values in "
              f"{len(params)} tensors ({cfg.mode}"
              f"{f', top {cfg.top_layers} layers' if cfg.top_layers else ''}, head {cfg.head})")
        # Tokenise once. The prompt is scored at the mask (masked LMs) or after its last token
        # (causal LMs).
        tokenizer, words = loaded.tokenizer, loaded.words
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        max_length = cfg.max_length
        positions = models.max_tokens(self.model) or max_length
        if max_length > positions:  # past the model's positions: cut there
            max_length = positions
            print(f"mezo: --max-length {cfg.max_length} is past the model's {positions} positions; "
                  f"inputs are cut to {positions} tokens")
        self.splits = encode_splits(tokenizer, loaded.data, loaded.template, loaded.kind,
                                    max_length, len(words), loaded.candidates)
        print(f"mezo: {cfg.task} " + ", ".join(f"{name} {len(rows)}"
                                               for name, rows in self.splits.items()))
        # what batch_indices gives a step
        batch_size = min(cfg.batch_size, len(self.splits["train"]))
        if batch_size < cfg.batch_size and placement.is_main:
            print(f"mezo: note: --batch-size {cfg.batch_size} is more than the "
                  f"{batch_size} training examples; each step takes all {batch_size}")
        if batch_size < placement.dp:  # decided alike on every rank
            raise UsageError(f"a step's batch has {batch_size} examples (--batch-size "
                             f"{cfg.batch_size}, {len(self.splits['train'])} training examples), "
                             f"fewer than --dp {placement.dp}: every data-parallel rank needs one; "
                             "lower --dp, or raise --batch-size or --k")
        if hasattr(self.forward, "prepare"):  # e.g. cache/ keeps the prompts' shared prefix
            ids = [e["ids"] for rows in self.splits.values() for e in rows]
            print(f"mezo: {self.forward.prepare(ids)}")
        self.per_step = dict(forwards=1, backwards=1) if optimizer else dict(
            forwards=2 * cfg.n_samples + getattr(rule, "extra_forwards", 0), backwards=0)
        self.step_times, self.forward_times, self.last_saved, self.evals = [], [], None, {}
        self.start, self.log, self.counts, self.idle = 0, None, {}, False
        self.replay = self._read_replay() if cfg.replay else None
        self.tail = {}  # a resume's steps rebuilt from the log (ReplayMixin._read_tail)
        self.logged_evals = {}  # and the evaluations the log holds of them

    # --- the data of a step -----------------------------------------------------------------------

    def batch(self, step: int) -> list[dict]:
        """This process's examples of a step: a pure function of (seed, step), so a resume sees the
        same."""
        rows = batch_indices(self.cfg.seed, step, len(self.splits["train"]), self.cfg.batch_size)
        return self.placement.local([self.splits["train"][i] for i in rows])

    def loss_fn(self, step: int) -> StepLoss:
        """The step's loss at the current θ: a forward on this process's examples of the step, or in
        a --replay the logged L± (ReplayMixin), served in the order mezo_step asks for them."""
        if self.replay is not None or step in self.tail:
            return self.replayed(step)
        return StepLoss(self, self.batch(step))

    def logits(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-word logits (N, C) and labels (N,), run as micro-batches; the forward time is kept.
        """
        t = time.perf_counter()
        out = batch_logits(self.forward, examples, self.cfg.micro_batch, self.pad_id, self.device)
        self.forward_times.append(time.perf_counter() - t)
        return out

    def loss_parts(self, batch: list[dict]):
        """--optimizer adam: the batch's cross-entropy as one part per micro-batch (the part's sum /
        batch size), each made after the last one's backward; only the forwards' time is kept."""
        spent = 0.0
        for part in micro_batches(batch, self.cfg.micro_batch, self.pad_id, self.device):
            t = time.perf_counter()
            loss = F.cross_entropy(self.forward(part), part["labels"], reduction="sum") / len(batch)
            spent += time.perf_counter() - t
            yield loss
        self.forward_times.append(spent)

    # --- the schedule: progress, logging, evaluation, checkpoints ---------------------------------

    def evaluates_at(self, step: int) -> bool:
        if self.replay is not None:
            return False  # a replay runs no forward: its checkpoint is the point
        return step == self.cfg.steps or bool(self.cfg.eval_every
                                               and step % self.cfg.eval_every == 0)

    def saves_at(self, step: int) -> bool:
        """θ itself is needed after this step (an evaluation or a checkpoint, the last step's
        included, which a replay writes without evaluating): no perturbation may carry over. The
        loop asks once a step, before θ is settled: a stop asked for by a signal is fixed here, on
        every rank at once."""
        if self.stop.step is None and self.placement.any_rank(self.stop.signal is not None):
            self.stop.step = step
            self.stop.signal = self.stop.signal or "another rank's signal"
            self.stop.code = self.stop.code or 128 + signal.SIGTERM
        return self._saves(step)

    def _saves(self, step: int) -> bool:
        return (self.evaluates_at(step) or step in (self.cfg.steps, self.stop.step)
                or bool(self.cfg.save_every and step % self.cfg.save_every == 0))

    def __enter__(self):
        """The run's folder is this process's until __exit__: its lock (FolderLock) is taken here.
        """
        if self.out and self.placement.is_main:
            make_out(self.out, self.cfg.out)
            self.lock = FolderLock(self.out, self.cfg.out)
            try:
                if self.into:  # a killed replay's leftovers are this replay's to clear
                    for leftover in set(self.out.iterdir()) - {self.lock.path}:
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                    claim(self.into, self.cfg.overwrite, "--replay … --out")
            except BaseException:
                self.__exit__(None, None, None)
                raise
        if self.out and not self.into:  # (a replay keeps nothing of its own)
            self.stop.install(say=self.placement.is_main)  # every rank: saves_at agrees the step
        return self

    def __exit__(self, *exc) -> None:
        """The folder's lock goes when the run ends; a replay that did not finish leaves --out as it
        was."""
        self.stop.restore()
        if self.into and self.out.exists():  # (once it has moved into place it is not there)
            shutil.rmtree(self.out, ignore_errors=True)
        if self.lock:
            self.lock.release()

    def steps(self, resume: str | None):
        """The steps still to run, behind a progress bar: after the resume, the log and the first
        evaluation."""
        if self.out and self.placement.is_main and not self.into:
            if fresh_into(self.out, resume):
                claim(self.out, self.cfg.overwrite, "--out", locked=True)
                trunk = Path(resume or "") / "log.jsonl"
                if resume and trunk.is_file():  # a branch's log starts with its trunk's steps
                    log = trunk.read_bytes()  # (a replay of the branch reads them)
                    checkpoints.atomic_write(self.out / "log.jsonl",
                                             lambda tmp: tmp.write_bytes(log))
        self.start = self.resume(resume) if resume else 0
        if resume and self.tail:
            print(f"mezo: steps {self.start + 1}-{max(self.tail)} rebuilt from {resume}/log.jsonl "
                  "(their logged losses: no forward)")
        # the checkpoint's step is due an evaluation that a signal cut short (Run.evaluate)
        unevaluated = bool(resume) and self.start > 0 and self.evaluates_at(self.start) and not (
            logged_evaluation(Path(self.out or resume) / "log.jsonl", self.start))
        # a finished run resumed again: no writes
        self.idle = bool(resume) and self.start == self.cfg.steps and not unevaluated
        writes = self.placement.is_main and not self.idle
        # at step 0 with nothing to rebuild, a resume starts the log afresh
        fresh = not resume or (self.start == 0 and not self.tail)
        # (a resume keeps the log's records of the steps it rebuilds from them)
        self.log = Log(self.out if writes else None,
                       None if fresh else max(self.tail, default=self.start),
                       redo=self.start if unevaluated else None)
        gap = next((t for t in range(1, self.start + 1) if t not in self.log.kept), None)
        if resume and writes and self.out and self.cfg.optimizer == "mezo" and gap:
            print(f"mezo: note: {self.out / 'log.jsonl'} has no record of step {gap} (cut short or "
                  "edited): the run goes on from its checkpoint, but --replay rebuilds it only up "
                  f"to step {gap - 1}")
        if writes and self.out and not self.into:  # what a resume before any checkpoint reads
            config = json.dumps(dataclasses.asdict(self.cfg), indent=1)
            checkpoints.atomic_write(self.out / checkpoints.RUN_CONFIG,
                                     lambda tmp: tmp.write_text(config))
        self.counts = {k: self.log.last_step.get(k, n * self.start)
                       for k, n in self.per_step.items()}
        self.t0 = time.time()
        peak_memory_mb(self.device, reset=True)  # from here on: evaluations and steps, not loading
        if fresh and self.replay is None and not self.idle:
            self.evals[0] = self.evaluate(0)
            if self.evals[0] is None:  # cut short: nothing trained, a resume evaluates it
                raise Stopped(self.stop.signal, 0, self.stop.code)
        if unevaluated:
            print(f"mezo: step {self.start}'s evaluation is not in the log (a stop cut it short): "
                  "it runs now")
            evals = self.evaluate(self.start)
            if evals is None:  # (cut short again)
                raise Stopped(self.stop.signal, self.start, self.stop.code)
            self.evals[self.start] = evals
        self.bar = tqdm(range(self.start + 1, self.cfg.steps + 1), initial=self.start,
                        total=self.cfg.steps, desc="mezo", dynamic_ncols=True,
                        disable=not self.placement.is_main)
        return self.bar

    @contextlib.contextmanager
    def timed_step(self, step: int):
        """Times the step. A non-finite loss stops the run; the tensors are θ_{step-1} after a ±ε
        round trip (not bit for bit θ_{step-1}), so nothing is saved from them: keep_last_good
        rebuilds the last good step."""
        t = time.perf_counter()
        try:
            yield
        except NonFiniteLoss as e:
            self.bar.close()
            error = NonFiniteLoss(f"non-finite loss at step {step} ({e})")
            error.step, error.saved = step, self.last_saved  # what keep_last_good starts from
            raise error from None
        if step not in self.tail:  # (a step rebuilt from the log ran no forward)
            self.step_times.append(time.perf_counter() - t)

    def record(self, step: int, record: dict) -> None:
        """Log the step (with the passes over a training batch so far), then evaluate and save when
        due."""
        if step in self.tail:  # rebuilt from the log, which keeps its record: checked against it
            self._check_replayed(step, record)
            self.counts = {k: self.tail[step].get(k, self.counts[k] + n)
                           for k, n in self.per_step.items()}
        else:
            self.counts = {k: self.counts[k] + n for k, n in self.per_step.items()}
            if self.replay is not None:
                self._check_replayed(step, record)
            samples = record.pop("samples", None)  # n > 1 directions: each sample's numbers last
            self.log.write(dict(step=step, **record, **self.counts)
                           | (dict(samples=samples) if samples else {}))
        shown = self.evals[max(self.evals)] if self.evals else {}
        self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                             acc=f"{shown.get('test', float('nan')):.3f}")
        if self._saves(step):  # before the evaluation, which a stop does not wait for
            self.checkpoint(step)
        if self.evaluates_at(step):  # (a step rebuilt from the log: its logged evaluation)
            evals = self.logged_evals.get(step) or self.evaluate(step)
            if evals is None:  # cut short by a signal: a resume evaluates the step again
                self.stop.step = step
            else:
                self.evals[step] = evals
        if self.stop.step == step and (step < self.cfg.steps or step not in self.evals):
            self.bar.close()
            raise Stopped(self.stop.signal, step, self.stop.code)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        """Dev and test accuracy; test is cut to --eval-max rows (spread_rows) between the first and
        the last evaluation. Logged together once both are in. Once step's checkpoint is written,
        a signal cuts the evaluation short (None, nothing logged): a scheduler's grace period is
        shorter than a whole test set on a CPU, and a resume evaluates the step. So it does at step
        0, whose θ is the model's own. (Not under torchrun: every rank's forwards must meet in the
        same collectives.)"""
        results, records, final = {}, [], step == self.cfg.steps
        forward = self.forward
        if (self.last_saved == step or step == 0) and not distributed(self.cfg):
            def forward(batch):
                if self.stop.signal:
                    raise Stopped(self.stop.signal, step, self.stop.code)
                return self.forward(batch)
        for split in ("dev", "test"):
            rows, limit = self.splits[split], self.cfg.eval_max if step else self.cfg.eval_max_start
            rows = spread_rows(rows, limit) if split == "test" and limit and not final else rows
            mine = self.placement.local(rows)
            acc = loss = 0.0
            if mine:
                try:
                    logits, labels = batch_logits(forward, mine, self.cfg.micro_batch,
                                                  self.pad_id, self.device)
                except Stopped:
                    return None
                acc, loss = ((logits.argmax(-1) == labels).float().mean().item(),
                             F.cross_entropy(logits, labels).item())
            acc, loss = self.placement.mean(acc, len(mine)), self.placement.mean(loss, len(mine))
            records.append(dict(step=step, split=split, accuracy=acc, loss=loss, n=len(rows)))
            results[split] = acc
            tqdm.write(f"step {step:6d} | {split:4s} accuracy {acc:.4f} loss {loss:.4f} "
                       f"({len(rows)} examples)")
        self.log.write(*records)
        return results

    def checkpoint(self, step: int) -> None:
        """Full tensors (gathered from shards by every rank), written by one; LoRA also as a PEFT
        adapter."""
        if not self.out:
            return
        full = {p.name: p.tensor for p in self.placement.gather(self.params)}
        rule = self._rule_state()  # (gathered by every rank, as θ is)
        if self.placement.is_main:
            extra = (adam_state(self.optimizer, {p.name: p.tensor for p in self.params})
                     if self.optimizer else {})
            checkpoints.save_checkpoint(self.out, full | extra | rule, step,
                                        dataclasses.asdict(self.cfg),
                                        [[p.name, p.offset] for p in self.params], self.data)
            if self.cfg.mode == "lora":
                lora = {n: t for n, t in full.items() if n.endswith((".lora_A", ".lora_B"))}
                checkpoints.save_peft_adapter(self.out / "adapter", lora, self.cfg.lora_r,
                                              self.cfg.lora_alpha, self.model_path,
                                              models.model_kind(self.model) == "causal")
        self.last_saved = step

    def _rule_state(self) -> dict:
        """--rule's buffers as full tensors named 'rule.<buffer>:<tensor>', and its step count as
        'rule.t'."""
        if self.rule is None or not self.rule.buffer_names:
            return {}
        state = self.rule.state(self.params)
        pieces = [dataclasses.replace(p, name=f"rule.{b}:{p.name}", tensor=state[f"{b}:{p.name}"])
                  for b in self.rule.buffer_names for p in self.params]
        return {p.name: p.tensor for p in self.placement.gather(pieces)} | {"rule.t": state["t"]}

    def resume(self, folder: str) -> int:
        """Load a checkpoint's tensors (and AdamW's state) into this run; return the step it was
        taken at. A run killed before its first checkpoint goes on from its start (the model and
        the run seed make its first tensors), its logged steps rebuilt."""
        if not (Path(folder) / checkpoints.CHECKPOINT).is_file() and (
                Path(folder) / checkpoints.RUN_CONFIG).is_file():
            saved = checkpoints.saved_config(Path(folder))
            check_same_run(self.cfg, saved, "--resume", folder)
            print(f"mezo: resumed from {folder} at step 0 (it stopped before its first checkpoint)")
            self.tail = self._rebuilds(folder, 0, saved)
            return 0
        tensors, start, saved = checkpoints.read_checkpoint(Path(folder))
        check_same_run(self.cfg, saved, "--resume", folder)
        if start > self.cfg.steps:  # never relabel step `start`'s tensors as an earlier step's
            raise UsageError(f"--resume {folder} --steps {self.cfg.steps}: the run is at step "
                             f"{start} already and a resume only goes on from there: give --steps "
                             f"{start} or more (step {self.cfg.steps}'s tensors: --replay "
                             f"{shlex.quote(folder)} --out NEW_DIR --steps {self.cfg.steps})")
        adam = {k: tensors.pop(k) for k in list(tensors) if k.startswith("adam:")}
        rule = {k[len("rule."):]: tensors.pop(k) for k in list(tensors) if k.startswith("rule.")}
        checkpoints.check_match(Path(folder), tensors,
                                {p.name: (p.full_shape, p.tensor.dtype) for p in self.params})
        with torch.no_grad():
            # a shard takes its slice of the full tensor: any world size resumes
            for p in self.params:
                p.tensor.copy_(tensors[p.name][tuple(
                    slice(s, s + n) for s, n in zip(p.shard_start, p.tensor.shape))])
        if self.optimizer:
            restore_adam_state(self.optimizer, {p.name: p.tensor for p in self.params}, adam)
        if self.rule is not None:
            try:
                self.rule.load(rule, self.params)
            except ValueError as e:
                raise UsageError(f"--resume {folder}: {e}") from None
        print(f"mezo: resumed from {folder} at step {start}")
        self.last_saved = start
        self.tail = self._rebuilds(folder, start, saved)
        return start

    def finish(self) -> dict:
        """The last checkpoint, then summary.json: wall time, passes, peak memory, median step and
        forward time."""
        self.bar.close()
        if self.idle:
            print(f"mezo: {self.out} is at step {self.start} already: nothing to run, "
                  "nothing changed")
            if self.out and (self.out / "summary.json").is_file():
                self.placement.close()
                return json.loads((self.out / "summary.json").read_text())
        if self.replay is not None:  # what it did, said once it is in place
            replayed = (f"mezo: step {self.cfg.steps}'s tensors rebuilt from {self.cfg.replay}'s "
                        f"log, no forward run" + (", equal bit for bit to the run's checkpoint"
                                                  if self._check_against_the_runs_checkpoint()
                                                  else "") + f": {self.into}")
        if self.last_saved != self.cfg.steps:
            self.checkpoint(self.cfg.steps)
        wall_time, per_step = time.time() - self.t0, self.per_step["forwards"]
        summary = dict(optimizer=self.cfg.optimizer, steps=self.cfg.steps, wall_time=wall_time,
                       evals=self.evals, **self.counts, peak_memory_mb=peak_memory_mb(self.device),
                       trainable=sum(math.prod(p.full_shape) for p in self.params))
        if self.step_times and self.forward_times:  # (a replay runs no forward)
            s, f = float(np.median(self.step_times)), float(np.median(self.forward_times))
            summary.update(step_time=s, forward_time=f, ratio=s / (per_step * f))
            print(f"mezo: {len(self.step_times)} steps, median {s:.3f} s/step, forward {f:.3f} s, "
                  f"step / ({per_step} x forward) = {summary['ratio']:.3f}")
        if hasattr(self.forward, "stats"):
            summary["cache"] = self.forward.stats()
            print("mezo: cache: " + ", ".join(f"{k} {v}" for k, v in summary["cache"].items()))
        last = self.evals[max(self.evals)] if self.evals else {}
        accuracies = ", ".join(f"{k} accuracy {v:.4f}" for k, v in last.items())  # (a replay: none)
        print(f"mezo: done in {wall_time:.0f} s" + (f"; {accuracies}" if accuracies else ""))
        # this process's part of the run (a resumed run writes its own)
        if self.out and self.placement.is_main:
            write = lambda tmp: tmp.write_text(json.dumps(summary, indent=1))
            checkpoints.atomic_write(self.out / "summary.json", write)
            if self.into:  # checked, complete: now it is --out
                move_into_place(self.out, self.into, self.cfg.overwrite)
                print(replayed)
        self.placement.close()
        return summary


# --- the run folder: one writer, no run written over, the same run resumed or replayed ------------

# a folder with one holds a run
RUN_FILES = (checkpoints.CHECKPOINT, "log.jsonl", "summary.json", "adapter", checkpoints.RUN_CONFIG)


def spread_rows(rows: list, limit: int) -> list:
    """`limit` rows spread evenly through `rows`, the same ones at every evaluation: a test file
    sorted by label (LM-BFF's MR, CR, MPQA and Subj) gives each class its share, where its first
    rows would all be one class."""
    n = len(rows)
    return rows if limit >= n else [rows[i * n // limit] for i in range(limit)]


class StopOnSignal:
    """Ctrl-C (SIGINT), SIGTERM (a scheduler's preemption, `kill`, `timeout`, `docker stop`) or
    SIGHUP (its terminal or ssh session closed) while a run with --out trains: the step under way
    finishes, its checkpoint is written, and errors.Stopped goes up, so no step trained is lost.
    The signal asks; Run.saves_at fixes the step, whose θ the loop then settles. A second signal
    stops at once, from the last checkpoint. Installed only from the main thread, and not over a
    signal the process was started to ignore (a `nohup` job's SIGHUP, a background job's SIGINT)."""
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    if hasattr(signal, "SIGHUP"):  # (Windows has none)
        NAMES[signal.SIGHUP] = "SIGHUP"

    def __init__(self):
        self.signal, self.step, self.code, self.previous, self.say = None, None, None, {}, True

    def install(self, say: bool = True) -> None:
        """say: this process announces the stop (under torchrun, rank 0 alone)."""
        self.say = say
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.NAMES:
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                self.previous[signum] = signal.signal(signum, self._asked)

    def _asked(self, signum, frame) -> None:
        name = self.NAMES[signum]
        quiet_if_hung_up()
        if self.signal:  # asked twice: stop now
            raise Stopped(name, None, 128 + signum)
        self.signal, self.code = name, 128 + signum
        if self.say:
            print(f"\nmezo: {name}: stopping after this step, once its checkpoint is written "
                  f"({name} again stops at once, from the last checkpoint)", file=sys.stderr,
                  flush=True)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


def quiet_if_hung_up() -> None:
    """stdout and stderr to /dev/null where they take no more writes: a terminal that hung up (a
    closed window or ssh session, SIGHUP's usual cause) fails each write with EIO, and the next
    progress bar would end the run mid-step instead of at its checkpoint. A write of no bytes
    asks."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


class FolderLock:
    """One writer per run folder: an flock on FOLDER/.lock (on Windows, msvcrt's lock, not tested
    here), held until release() (Run: the run's whole life). The kernel drops it when its process
    ends, a kill -9 included, so a stale .lock never blocks a --resume. The file stays empty: the
    holder's PID comes from /proc/locks; and the lock that made it removes it, so a refused
    command leaves the folder as it was."""

    def __init__(self, folder: Path, shown: str | Path, flag: str = "--out"):
        self.path = folder / ".lock"
        while True:
            self.created = not self.path.exists()
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only folder: refused before anything is loaded or written
                raise UsageError(f"{flag} {shown}: cannot write there ({e.strerror}); make it "
                                 f"writable or pick another {flag}") from None
            try:
                if fcntl:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:  # Windows: a lock on byte 0, also dropped when the process ends
                    import msvcrt
                    msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
            except (BlockingIOError, PermissionError):  # (msvcrt: EACCES)
                pid = lock_holder(self.fd)
                os.close(self.fd)
                what = "then --resume it" if flag == "--resume" else f"or pick another {flag}"
                raise UsageError(f"{shown}: another run (PID {pid}) is writing this folder; wait "
                                 f"for it to end, {what}") from None
            if self.path.exists() and os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                return
            os.close(self.fd)  # its holder removed that file as this one locked it (release): again

    @classmethod
    def ask(cls, folder: Path, shown: str | Path, flag: str = "--out") -> None:
        """Refused (one line) where another run is writing folder now; nothing is held after."""
        if (folder / ".lock").exists():
            cls(folder, shown, flag).release()

    def release(self) -> None:
        """The lock goes, and the .lock file with it where this lock made it: a refused command
        leaves a user's folder as it was."""
        if self.fd is not None:
            if self.created:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self.fd)
            self.fd = None


def lock_holder(fd: int) -> str:
    """The PID that holds an flock on fd's file, from /proc/locks (Linux); '?' where that cannot be
    read."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            # e.g. "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF" ("->" lines wait)
            for line in f:
                fields = line.split()
                if ("->" not in fields and fields[1:2] == ["FLOCK"]
                        and fields[5].endswith(f":{inode}")):
                    return fields[4]
    except (OSError, IndexError):
        pass
    return "?"


def fresh_into(out: Path, resume: str | None) -> bool:
    """A run into out is a fresh one, or a branch of --resume's run, not --resume's run itself: out
    must hold no run."""
    return not (resume and Path(resume).resolve() == out.resolve())


def claim(folder: Path, overwrite: bool, flag: str, locked: bool = False) -> None:
    """A fresh run (or a replay's result) goes only into a folder that holds no run, or with
    --overwrite, which removes that run's files first. A folder another process writes is refused
    whatever the flags."""
    if not folder.is_dir():
        return
    if not locked:
        FolderLock.ask(folder, folder)
    foreign = [] if flag == "--out" else run_foreign(folder)  # a replay replaces the whole folder
    if foreign:
        more = len(foreign) - 3
        shown = ", ".join(foreign[:3]) + (f" and {more} more" if more > 0 else "")
        raise UsageError(f"{flag} {folder} holds files that are not a run's ({shown}); a replay "
                         "replaces the whole folder: give it a new or empty one (nothing was "
                         "changed)")
    old = [name for name in RUN_FILES if (folder / name).exists()]
    if old and not any(written_by_a_run(folder / name) for name in old):
        raise UsageError(f"{flag} {folder} holds {', '.join(old)}, not written by a mezo run: "
                         "move it, or pick another folder (nothing was changed)")
    if old and not overwrite:
        raise UsageError(f"{flag} {folder} already holds a run ({', '.join(old)}): --resume "
                         f"{shlex.quote(str(folder))} to go on with it, --overwrite to replace it, "
                         "or pick another --out (nothing was changed)")
    # (a replay's result replaces the folder when it moves in)
    for name in old if flag == "--out" else ():
        if name == "adapter":  # its two files; a file of the user's in it stays, and the folder
            for file in (checkpoints.ADAPTER_WEIGHTS, checkpoints.ADAPTER_CONFIG):
                (folder / name / file).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # (not empty)
                (folder / name).rmdir()
        elif not (folder / name).is_dir():  # (a folder of that name: the write names it)
            (folder / name).unlink()


def written_by_a_run(path: Path) -> bool:
    """path (one of RUN_FILES) reads as a run wrote it: a checkpoint with its step, a log whose
    first line is a record, a summary with its steps, a run.json with its task, an adapter with
    its config. A user's file of the same name does not, and --overwrite does not remove it."""
    try:
        if path.name == checkpoints.CHECKPOINT:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                return "step" in (f.metadata() or {})
        if path.name == "adapter":
            return (path / checkpoints.ADAPTER_CONFIG).is_file()
        with open(path, encoding="utf-8") as f:
            text = f.readline() if path.name == "log.jsonl" else f.read()
        if not text:  # (empty: a run's log cut short before its first record; nothing to lose)
            return True
        record = json.loads(text)
        key = {"log.jsonl": "step", "summary.json": "steps"}.get(path.name, "task")
        return isinstance(record, dict) and key in record
    except Exception:  # (not JSON, not UTF-8, not safetensors, a folder, unreadable)
        return False


def run_foreign(folder: Path) -> list[str]:
    """What a run folder holds that is not a run's, as paths in it: in adapter/ too (PEFT's own
    save_pretrained puts a README.md there)."""
    killed = lambda p: p.name.startswith(".") and ".tmp" in p.name  # a killed write's .NAME.tmpPID
    adapter = folder / "adapter"
    inside = [f"adapter/{p.name}" for p in adapter.iterdir() if not killed(p) and p.name not in (
        checkpoints.ADAPTER_WEIGHTS, checkpoints.ADAPTER_CONFIG)] if adapter.is_dir() else []
    own = (*RUN_FILES, ".lock", ".rebuild")
    return sorted([p.name for p in folder.iterdir() if p.name not in own and not killed(p)]
                  + inside)


def move_into_place(built: Path, into: Path, overwrite: bool) -> None:
    """A replay's checked folder becomes --out: whatever was there (nothing, an empty folder, or
    with --overwrite a run) is moved aside first and removed last, so --out always holds one whole
    folder."""
    aside = into.with_name(f".{into.name}.old{os.getpid()}")  # (never an earlier one's leftover)
    if into.exists():
        # asked again: a run may have started there meanwhile
        claim(into, overwrite, "--replay … --out")
        os.replace(into, aside)
    os.replace(built, into)
    shutil.rmtree(aside, ignore_errors=True)


# What makes a run the run it is: resume and replay refuse a change to these, in one check.
# SAME_STEPS decide each step's update: a replay must take them as the run had them (else its
# tensors are not the run's), and a resume may change them for the steps after it (a lower --lr or
# --eps is the way past a non-finite loss).
SAME_RUN = ("task", "k", "data_seed", "template", "label_words", "max_length", "model", "dtype",
            "head", "mode", "lora_r", "lora_alpha", "lora_targets", "lora_dtype", "top_layers",
            "num_prefix", "seed", "optimizer", "rule")
SAME_STEPS = ("lr", "eps", "weight_decay", "n_samples", "beta", "batch_size", "objective",
              "exact_restore")


def check_same_run(cfg, saved: dict, flag: str, folder) -> None:
    """cfg against the config a run's checkpoint keeps (a field it lacks had its default): one line
    on a change."""
    for name, was, now in changed(cfg, saved, SAME_RUN + (SAME_STEPS if flag == "--replay"
                                                           else ())):
        if name == "model" and same_model_folder(str(was), str(now)):
            # the model's folder moved or was copied: --model says where; check_match compares
            # tensors
            continue
        show = lambda v: ",".join(v) if isinstance(v, tuple) else v
        option = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} {folder}: the run was trained with {option} {show(was)}; "
                         f"{flag[2:]} it with the same {name.replace('_', ' ')} (drop {option} "
                         f"{show(now)})")


def changed(cfg, saved: dict, names):
    """(name, was, now) for each of names whose value in a saved config (a field it lacks had its
    default) differs from cfg's."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in names:
        was, now = saved.get(name, defaults[name]), getattr(cfg, name)
        was = tuple(was) if isinstance(was, list) else was
        if was != now:
            yield name, was, now


def distributed(cfg) -> bool:
    """Whether the run is one of several processes under torchrun (--tp, --dp or WORLD_SIZE)."""
    return cfg.tp > 1 or cfg.dp > 1 or world_size() > 1


def world_size() -> int:
    """torchrun's WORLD_SIZE (1 without it). One left over in a shell, or set by hand without the
    rest of torchrun's variables, is one line, not a traceback from torch.distributed."""
    text = os.environ.get("WORLD_SIZE", "1")
    world = int(text) if text.strip().isdigit() else 0
    if world < 1:
        raise UsageError(f"WORLD_SIZE={text!r} is not a number of processes: unset it to run one "
                         "process, or launch with torchrun, which sets it")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if world > 1 and k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} is set but not {', '.join(missing)}: unset "
                         f"WORLD_SIZE to run one process, or launch with torchrun --nproc-per-node "
                         f"{world} (it sets them all)")
    return world


def same_model_folder(was: str, now: str) -> bool:
    """A run's model given by another path: its old folder is gone, or both hold the same
    config.json."""
    if was.lower() == now.lower() == models.SMOLLM2["alias"]:  # the alias, in any case
        return True
    if "/" not in was or was == now:
        return was == now
    old, new = Path(was), Path(now)
    if not old.exists():
        return True
    read = lambda folder: ((folder / "config.json").read_bytes()
                           if (folder / "config.json").is_file() else None)
    return read(old) is not None and read(old) == read(new)


def stopped(cfg, trained: bool, why: BaseException) -> str:
    """What to say when a run stops early: stdout's reader left (`python mezo.py ... | head`; stdout
    then points at /dev/null, so nothing left in its buffer fails again at exit), Ctrl-C or SIGTERM
    (errors.Stopped: after the step under way and its checkpoint, or at once when asked twice)."""
    if isinstance(why, Stopped) and why.step == 0:
        return (f"stopped by {why.signal} at step 0's evaluation, before any step: --resume "
                f"{shlex.quote(cfg.out)} starts there")
    if isinstance(why, Stopped) and why.step is not None:
        return (f"stopped by {why.signal} after step {why.step}, its checkpoint written: --resume "
                f"{shlex.quote(cfg.out)} goes on from there")
    said = f"interrupted ({getattr(why, 'signal', 'Ctrl-C')}): "
    if isinstance(why, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        said = "stdout was closed (its reader left, as `| head` does): "
    if trained:
        return said + "the run finished, its last lines unprinted"
    if not (cfg and cfg.out):
        return said + "the run stopped"
    out = shlex.quote(cfg.out)  # as a command takes it
    if (Path(cfg.out) / checkpoints.CHECKPOINT).exists():
        return said + f"the run stopped; --resume {out} goes on from its last checkpoint"
    if (Path(cfg.out) / checkpoints.RUN_CONFIG).exists():
        return said + f"the run stopped before its first checkpoint; --resume {out} goes on"
    if not any((Path(cfg.out) / name).exists() for name in RUN_FILES):  # (stopped as it loaded)
        return said + "the run stopped before it wrote anything; the same command starts it"
    return said + "the run stopped before its first checkpoint; --overwrite starts it again"


def keep_last_good(error: NonFiniteLoss, cfg, train) -> str:
    """After a non-finite loss at step s, the error line, and the exact tensors of the last good
    step kept as the run's checkpoint. The forwards at θ_{s-1} ± εz were not finite, so the last θ
    whose forwards were is θ_{s-2}: rebuilt bit for bit by a replay of the log (train(cfg, resume)
    with --replay), from the run's checkpoint when that is not later, else from the start. A lower
    --lr then changes step s-1's update, a lower --eps both."""
    s, out, saved = getattr(error, "step", None), cfg.out, getattr(error, "saved", None)
    if s is None:
        return str(error)
    good = s - 2
    if good < 0:
        fix = (f"the model overflows in --dtype {cfg.dtype}: try float32" if cfg.dtype != "float32"
               else "the model's weights or inputs are not finite: check --model")
        return (f"{error}: the run's first forwards, at its starting tensors ± ε·z, were not "
                "finite, so there is no good step to keep. If step 0's evaluation printed a "
                f"finite loss, a smaller --eps may get past it; if not, {fix}")
    if not out:
        return f"{error}. Without --out nothing was kept: run again with a lower --lr or --eps"
    quoted = shlex.quote(out)  # as a command takes it
    again = (f"--resume {quoted} --steps {cfg.steps} with a lower --lr (step {s - 1}'s update led "
             "there) or --eps gets past it")
    if saved != good and distributed(cfg):
        return (f"{error}: rebuild step {good}'s exact tensors, the last whose forwards were "
                f"finite, with one process: --replay {quoted} --out NEW_DIR --steps {good}; then "
                f"--resume NEW_DIR --steps {cfg.steps} with a lower --lr or --eps")
    if saved != good:
        rebuilt = Path(out) / ".rebuild"
        print(f"mezo: rebuilding step {good}'s tensors, the last whose forwards were finite, from "
              f"{out}/log.jsonl")
        lock = FolderLock(Path(out), out)
        try:
            # from the checkpoint, else the start
            since = out if saved is not None and saved < good else None
            train(dataclasses.replace(cfg, replay=out, out=str(rebuilt), steps=good,
                                      overwrite=True), since)
            # the checkpoint and the adapter; the run's log stays
            for path in sorted(rebuilt.rglob("*")):
                if path.is_file() and path.name in (checkpoints.CHECKPOINT,
                                                    checkpoints.ADAPTER_WEIGHTS,
                                                    checkpoints.ADAPTER_CONFIG):
                    (Path(out) / path.relative_to(rebuilt)).parent.mkdir(exist_ok=True)
                    os.replace(path, Path(out) / path.relative_to(rebuilt))
        except UsageError as e:
            if saved is not None and saved < good:
                return f"{error}; last good checkpoint (step {saved}) in {out}. {again}"
            kept = ("nothing was kept" if saved is None
                    else f"{out}'s checkpoint (step {saved}) is not a good one")
            return (f"{error}; the last good step ({good}) could not be rebuilt ({e}), and {kept}: "
                    "start again with --overwrite and a lower --lr or --eps")
        finally:
            shutil.rmtree(rebuilt, ignore_errors=True)
            lock.release()
    return (f"{error}; kept step {good}'s exact tensors, the last whose forwards were finite, in "
            f"{out}. {again}")


def user_path(text: str | None) -> str | None:
    """A folder the user named, as an absolute path with ~ expanded (a quoted or --out=~/... one is
    not expanded by the shell): run.json keeps it, and a --resume from another folder finds it."""
    return os.path.abspath(os.path.expanduser(text)) if text and text.strip() else text


def check_config(cfg) -> None:
    """Each option among its choices and in its range (options.check), and no two that cannot go
    together: any refusal is one line that says what to change. The folders it names become
    absolute (user_path); --model too where it is a local folder, not a hub name."""
    options.check(cfg)
    cfg.out, cfg.data_dir, cfg.replay = map(user_path, (cfg.out, cfg.data_dir, cfg.replay))
    if Path(cfg.model).expanduser().is_dir():
        cfg.model = user_path(cfg.model)
    task = tasks.TASKS.get(tasks.canonical(cfg.task))
    if cfg.template is not None:
        check_template(cfg.template, pair=bool(task and task.pair))
    if cfg.label_words is not None and len(cfg.label_words) != tasks.num_classes(cfg.task):
        words = "1 word" if len(cfg.label_words) == 1 else f"{len(cfg.label_words)} words"
        raise UsageError(f"--label-words gives {words}, but {cfg.task} has "
                         f"{tasks.num_classes(cfg.task)} classes: give one word per class, "
                         f"comma-separated, class 0 first (the task's: "
                         f"'{','.join(tasks.prompt(cfg.task, 'mlm')[1])}')")
    models.check_device(cfg.device)
    if cfg.mode == "head" and cfg.head != "cls":
        raise UsageError("--mode head trains the fresh classification head alone; it needs "
                         "--head cls")
    if cfg.mode == "prefix" and (cfg.cache or cfg.tp > 1 or cfg.top_layers):
        raise UsageError("--mode prefix puts virtual tokens on every attention layer: drop " + (
            "--cache (it reuses frozen layers' states, and the prefix changes every layer's "
            "attention)" if cfg.cache
            else "--tp (the prefix is not sharded across ranks; --dp works)" if cfg.tp > 1
            else "--top-layers"))
    if cfg.cache and cfg.tp > 1:
        raise UsageError("--cache runs the model's layers itself and does not take tensor-parallel "
                         "shards: drop --cache, or use --dp alone")
    zeroth_order = [flag for flag, given in (
        ("--objective accuracy", cfg.objective != "ce"), ("--fast", cfg.fast),
        ("--exact-restore", cfg.exact_restore), (f"--n-samples {cfg.n_samples}", cfg.n_samples > 1))
        if given]
    if cfg.optimizer == "adam" and zeroth_order:
        raise UsageError(f"--optimizer adam backpropagates the cross-entropy, and "
                         f"{' and '.join(zeroth_order)} {'are' if len(zeroth_order) > 1 else 'is'} "
                         "MeZO's: drop " + ("them" if len(zeroth_order) > 1 else "it"))
    if cfg.optimizer == "adam" and cfg.rule != "sgd":
        raise UsageError(f"--rule {cfg.rule} is a zeroth-order update rule; --optimizer adam is "
                         "the first-order baseline: drop one of them (MeZO-Adam is --rule adam)")
    if cfg.optimizer == "adam" and (cfg.tp > 1 or cfg.dp > 1 or cfg.cache):
        raise UsageError("--optimizer adam is the single-process baseline: drop --tp, --dp and "
                         "--cache")


# projected_grad's relative error against float32 by model dtype and ε, as bench/precision.py
# measured it (docs/precision.md: SmolLM2-135M, LoRA in float32, 16-shot SST-2, batch 8, 50 steps at
# lr 0)
PRECISION_ERROR = {
    "bfloat16": {0.001: 4.876, 0.003: 1.705, 0.01: 0.429, 0.03: 0.188},
    "float16": {0.001: 0.588, 0.003: 0.237, 0.01: 0.065, 0.03: 0.023},
}


def idle_flags(cfg) -> list[str]:
    """Flags set away from their defaults that the run's other flags leave without effect: a note
    each (a script may pass them always), so that none is believed to act."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    idle = [(("lora_r", "lora_alpha", "lora_targets", "lora_dtype"), cfg.mode != "lora",
             f"--mode {cfg.mode} trains no LoRA"),
            (("num_prefix",), cfg.mode != "prefix", f"--mode {cfg.mode} trains no prefix"),
            (("eps", "n_samples"), cfg.optimizer == "adam", "--optimizer adam perturbs nothing"),
            (("beta",), cfg.rule not in ("momentum", "adam"), f"--rule {cfg.rule} has no β"),
            (("cache_mb",), not cfg.cache, "there is no --cache"),
            (("save_every",), not cfg.out, "there is no --out to save into"),
            (("data_dir",), tasks.canonical(cfg.task) == "synthetic",
             "--task synthetic makes its own examples")]
    shown = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731 (as given)
    return [f"--{name.replace('_', '-')} {shown(getattr(cfg, name))} has no effect: {why}"
            for names, unused, why in idle if unused for name in names
            if getattr(cfg, name) != default[name]]


def precision_note(dtype: str, eps: float, flag: str = "--eps ") -> str | None:
    """One line when the forwards run in float16 or bfloat16 and the measured error of
    projected_grad at the measured ε nearest to eps is over 1: the estimate is then mostly the
    forwards' rounding. The run goes on. flag: how the caller's user spells ε."""
    errors = PRECISION_ERROR.get(dtype)
    if not errors:
        return None
    nearest = min(errors, key=lambda e: abs(math.log(e / eps)))
    if errors[nearest] <= 1:
        return None
    best = min(errors, key=errors.get)
    return (f"in {dtype}, projected_grad at {flag}{nearest:g} was measured "
            f"{errors[nearest]:.1f}x its own size away from float32's (SmolLM2-135M, 50 steps); "
            f"{flag}{best:g} measured {errors[best]:.2f}: consider it")


def step_record(samples: list[dict], lr: float) -> dict:
    """What the log keeps of a step: means over the samples, and the loss at θ, (L+ + L−)/2 (up to
    O(ε²))."""
    mean = lambda key: sum(s[key] for s in samples) / len(samples)
    return dict(seed=samples[0]["seed"], loss_plus=mean("loss_plus"), loss_minus=mean("loss_minus"),
                projected_grad=mean("projected_grad"), lr=lr,
                loss=(mean("loss_plus") + mean("loss_minus")) / 2,
                **(dict(samples=samples) if len(samples) > 1 else {}),
                # --rule conservative
                **{k: samples[0][k] for k in ("kept", "candidate_losses") if k in samples[0]})


def batch_indices(run_seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Examples of a step: epochs of a seeded permutation, a pure function of (seed, step) for exact
    resume."""
    if batch_size >= n:
        return list(range(n))
    out = []
    for pos in range((step - 1) * batch_size, step * batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([run_seed, epoch]).permutation(n)[i]))
    return out


class Log:
    """log.jsonl: one JSON object per step and per evaluation. resume_step: keep the records up to
    it (a crash may have left later ones); else start afresh."""

    def __init__(self, out: Path | None, resume_step: int | None = None, redo: int | None = None):
        """redo: a step whose evaluation runs again (a part of it logged is dropped)."""
        self.path = out / "log.jsonl" if out else None
        # on resume, the kept log's last step record (its cumulative pass counts go on)
        self.last_step, self.kept = {}, set()  # (the MeZO steps it keeps)
        if self.path and resume_step is not None and self.path.exists():
            keep = [r for r in read_log(self.path)
                    if r["step"] <= resume_step and not (r["step"] == redo and "split" in r)]
            checkpoints.atomic_write(self.path, lambda tmp: tmp.write_text(
                "".join(json.dumps(r) + "\n" for r in keep)))
            self.last_step = next((r for r in reversed(keep) if "forwards" in r), {})
            self.kept = {r["step"] for r in keep if "projected_grad" in r}
        elif self.path:
            checkpoints.atomic_write(self.path, lambda tmp: tmp.write_text(""))

    def write(self, *records: dict) -> None:
        """Appended in one write (an evaluation's dev and test records go in together)."""
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in records))
            except OSError as e:  # a full disk: a cut last line is dropped when the run is resumed
                raise checkpoints.cannot_write(self.path, e) from None


def logged_evaluation(path: Path, step: int) -> bool:
    """Whether a log holds step's whole evaluation, dev and test."""
    records = read_log(path) if path.is_file() else []
    return {"dev", "test"} <= {r.get("split") for r in records if r["step"] == step}


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl. A last line cut short (a crash mid-write) is dropped; any other
    line that is not a JSON record is refused in one line, before anything is written."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer step")
            check_step_record(record)
        except ValueError as e:
            if i == len(lines) and not line.rstrip().endswith("}"):
                break  # the partial last write of a run that was killed
            if i == 1 and path.name != "log.jsonl":  # summary.json, a user's file: not a log
                raise UsageError(f"{path}: line 1 is not a log record ({e}): it is not a mezo "
                                 "log.jsonl; give a run's log.jsonl, or its folder") from None
            raise UsageError(f"{path}: line {i} is not a log record ({e}); fix or delete that "
                             "line, then run again (nothing was changed)") from None
        records.append(record)
    return records


def check_step_record(record: dict) -> None:
    """A MeZO step's record holds what a replay reads, its seeds and losses, as numbers; else
    ValueError."""
    keys = ("seed", "loss_plus", "loss_minus", "projected_grad")
    if not set(keys) & set(record):
        return  # an evaluation, or a step of the first-order baseline
    parts = [(key, part.get(key)) for part in record.get("samples") or [record] for key in keys]
    parts += [("candidate_losses", v) for v in record.get("candidate_losses", [])]  # conservative
    for key, value in parts:
        if isinstance(value, bool) or not isinstance(value, int if key == "seed" else (int, float)):
            what = "missing" if value is None else repr(value)
            raise ValueError(f"step {record['step']}'s {key} is {what}")


def peak_memory_mb(device: torch.device, reset: bool = False) -> float | None:
    """Peak memory since the last reset, in MiB: torch's allocator on a GPU; on a Linux CPU the
    process's peak resident set (VmHWM), reset through /proc/self/clear_refs once the heap that
    loading freed is given back (glibc's malloc_trim), so that it does not count. None elsewhere."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        if reset:
            gc.collect()
            with contextlib.suppress(AttributeError, OSError, TypeError):  # (glibc's only)
                # freed memory that glibc keeps (e.g. the offline model's conversion, ~200 MB)
                ctypes.CDLL(None).malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set starts again from the current one
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
