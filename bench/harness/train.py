"""The training loop: one semi-supervised run in which only the selector changes.

The loop and only the loop. What a run is made of comes from `build_run`, the step from
its framework, the record from the `Recorder`, checkpoints from `checkpoint`, when to
evaluate from the `Schedule`, what to measure from `evaluator`. The loop feeds the step
batches without unlabelled ground truth (that goes to the selection meter here) and reads
the device only at log steps and checkpoints.
"""

from __future__ import annotations

from tqdm import tqdm

from bench.harness import evaluator
from bench.harness.build import build_run, poly_lr, split_truth, to_device, update_ema
from bench.harness.checkpoint import capture, save_checkpoint
from bench.harness.config import TrainConfig
from bench.harness.failures import DivergedError, SelectorInputError, raise_step_problems
from bench.harness.frameworks import Batch, StepOut
from bench.harness.recorder import Recorder, new_record, refuse_overwrite, resume_run
from bench.harness.schedule import Schedule
from bench.harness.tracking import Tracker
from bench.labels import IGNORE
from bench.results.record import RunRecord, read_record


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, tracker: Tracker | None = None, show_progress: bool = True, on_log=None):
        self.parts = parts = build_run(config)
        self.config, self.out = parts.config, parts.out
        if not resume:
            refuse_overwrite(parts)
        self.schedule = Schedule.for_run(parts.config, parts.framework.semi_supervised)
        record = new_record(parts)
        self.start_iter, record = resume_run(parts, record) if resume else (0, record)
        self.books = Recorder(parts, record, tracker, on_log)
        self.show_progress = show_progress

    def run(self) -> RunRecord:
        parts, log, books = self.parts, self.parts.log, self.books
        if books.record.status == "complete":
            print(f"{self.out}: already complete; nothing to do")
            return books.record
        books.running()
        parts.model.train()
        bar = tqdm(total=self.config.iters, initial=self.start_iter, desc=self.out.name, unit="it", disable=not self.show_progress, dynamic_ncols=True)
        t, failed = self.start_iter, True
        try:
            streams = [iter(loader) for loader in parts.train_loaders(self.start_iter)]
            log.start_clock()
            for t in range(self.start_iter, self.config.iters):
                lr = poly_lr(parts.optimizer, self.config, t)
                self.step(t, [next(s) for s in streams])
                self.after_step(t + 1, lr, bar)
                bar.update(1)
            self.read_steps()
            log.charge_time()
            self.finish()
            failed = False
        except BaseException as exc:
            cause = self.deferred_cause() if isinstance(exc, Exception) and parts.replicas.world == 1 else None
            failed = books.fail(cause or exc, t + 1)
            if cause is not None:
                raise cause from exc
            raise
        finally:
            bar.close()
            books.tracker.finish(failed=failed)
        return read_record(self.out)  # the file is the source of truth (NaN stored as null)

    def step(self, t: int, loaded: list[dict]) -> StepOut:
        """Training step t on the device: no host read, so on a GPU the CPU queues the next
        step while this one runs. Checks and numbers are read by `read_steps`."""
        parts = self.parts
        batch, gt = split_truth(*(to_device(b, parts.device) for b in loaded))  # truth kept apart
        if parts.seam is not None:
            parts.seam.begin(t + 1)
        out = self.optimise(t, batch)
        if out.selection is not None:
            parts.log.meter.update(out.selection, gt, ignore_index=IGNORE, valid=out.valid)
        parts.log.add_step(t + 1, {"loss": out.loss, **out.parts})
        return out

    def optimise(self, t: int, batch: Batch) -> StepOut:
        """The framework's step, the backward pass, the optimiser and the EMA teacher."""
        parts = self.parts
        with parts.autocast():
            out = parts.framework.step(parts.net, parts.ema, parts.seam, batch, self.config, t)
        parts.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        parts.optimizer.step()
        if parts.ema is not None:
            update_ema(parts.ema, parts.model, t + 1, self.config.ema_momentum)
        return out

    def after_step(self, done: int, lr: float, bar) -> None:
        """What the schedule asks for after iteration `done`; none of it counts as training time."""
        parts, log = self.parts, self.parts.log
        now = self.schedule.after(done)
        if now.reads_device:
            self.read_steps()  # the only host reads of the steps since the last
        if now.evaluate:
            with log.untimed():
                log.add_eval(evaluator.miou(parts), done)
        if now.bank and parts.replicas.is_main:
            with log.untimed():
                log.selection_over_training.append(evaluator.bank_and_score(parts, done))
        if now.log:  # val_miou at the iteration it was measured
            log.charge_time()
            point = self.books.log(done, lr)
            losses = {k.removeprefix("loss_") or k: f"{v:.3f}" for k, v in point.items() if k.startswith("loss")}
            bar.set_postfix(**losses, val_miou=f"{log.last_val:.3f}")
        if now.checkpoint:
            with log.untimed():
                self.checkpoint(done)

    def finish(self) -> None:
        parts = self.parts
        final = evaluator.final_miou(parts, parts.log.last_eval)
        auroc = evaluator.confidence_auroc(parts)
        self.checkpoint(self.config.iters)  # durable before the record says complete
        self.books.complete(final, auroc)

    def checkpoint(self, done: int) -> None:
        state = capture(self.parts, done)  # on every worker: the run log sums their counts
        if self.parts.replicas.is_main:
            save_checkpoint(self.out, state)

    def read_steps(self) -> None:
        """Read what the steps left on the device: a diverged or misused step stops the run
        here, before its weights are evaluated or checkpointed, naming its iteration."""
        parts = self.parts
        raise_step_problems(parts.log, parts.seam.read() if parts.seam is not None else None, parts.replicas)

    def deferred_cause(self) -> BaseException | None:
        """A divergence or misuse the device recorded before the failure (a NaN step can
        make a later op fail first): the cause worth reporting, or None."""
        try:
            self.read_steps()
        except (DivergedError, SelectorInputError) as found:
            return found
        except Exception:  # the device itself may be unusable after the failure
            return None
        return None
