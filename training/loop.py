"""The pieces of the training loop that train_gpt.py reads as one screen: one optimizer step, the
validation loss, the leaderboard's clock, the divergence check and the stop request."""
import signal
import time

import torch
import torch.distributed as dist

from data.loader import micro_batch_shares
from optim.schedules import loss_weights


def prepare_step(raw_model, optimizer, plan, step):
    """Sets what the update at `step` needs: the stage's attention windows (and YaRN), the loss weights,
    the float8 copies of the MLP weights, every learning rate and the momentum; returns the LR multiplier."""
    raw_model.set_windows(plan.windows_at(step))
    raw_model.set_loss_weights(*loss_weights(plan, step))
    raw_model.refresh_fp8(step)
    return optimizer.set_schedules(step)


def train_step(model, optimizer, micro_batches, autocast, step, config):
    """One update from this rank's micro-batches; returns the mean per-token loss as a tensor (no host sync),
    weighted so that its mean over ranks is the step's.

    `optimizer` (optim.Optimizer) decides when gradients travel between ranks (see its backward_context),
    and averages them over ranks. Each micro-batch's loss is weighed by the rows it holds against the
    step's rows per rank (data.loader.MicroBatches): the gradients' average over ranks is then the average
    over the step's rows however they fall on the ranks (3, 3, 2 on 3 GPUs) and into micro-batches (whole
    rows, or a row's pieces).
    """
    rows, rows_per_rank = micro_batch_shares(micro_batches)
    loss_sum = 0
    for i, ((inputs, targets), held) in enumerate(zip(micro_batches, rows)):
        # A mean loss is over the micro-batch's tokens, a summed one (record #46) over them without the
        # mean; either way the update's loss is the mean over the step's rows of each row's loss.
        share = rows_per_rank / held if config.loss_reduction == "mean" else rows_per_rank
        with optimizer.backward_context(step, last=i == len(micro_batches) - 1), autocast:
            loss = model(inputs, targets)
            (loss / share).backward()
        # a summed loss over the real targets (a padded piece's others add nothing)
        per_token = loss.detach() / ((targets >= 0).sum() if config.loss_reduction == "sum" else 1)
        loss_sum = loss_sum + per_token / (rows_per_rank / held)
    optimizer.step(step)
    return loss_sum


@torch.no_grad()
def validation_loss(model, batches, autocast, device, with_float32=False):
    """Mean per-token loss over every rank's validation batches; with_float32: (that loss, the loss with a
    float32 head matmul) (model.GPT.forward)."""
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sums (run's, float32 head), token count
    for inputs, targets in batches:
        with autocast:
            losses = model(inputs, targets, reduction="sum", with_float32=with_float32)
        for i, loss in enumerate(losses if with_float32 else (losses,)):
            totals[i] += loss.double()
        totals[2] += targets.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    loss, loss_float32 = (totals[:2] / totals[2]).tolist()
    return (loss, loss_float32) if with_float32 else loss


class TrainClock:
    """The leaderboard's train_time: only training counts, measured between device synchronisations.

    `pause()` ends a timed segment (validation, logging, checkpoints come after it), `resume()`
    starts the next one; `elapsed_ms` is the total, continued from a checkpoint's."""

    def __init__(self, runtime, elapsed_ms=0.0):
        self.runtime, self.elapsed_ms, self.started_ms = runtime, elapsed_ms, elapsed_ms
        self._segment_start = None

    def resume(self):
        self.runtime.synchronize()
        self._segment_start = time.perf_counter()

    def pause(self):
        self.runtime.synchronize()
        self.elapsed_ms += 1000 * (time.perf_counter() - self._segment_start)


class TrainingDiverged(RuntimeError):
    pass


class DivergenceWatch:
    """The step (1-based) of the first non-finite loss, kept on the device and read only where the
    loop synchronises anyway: a per-step check would stall the GPU queue every step."""

    def __init__(self, device):
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step, loss):
        self.first_bad_step = torch.where((self.first_bad_step == 0) & ~torch.isfinite(loss), step + 1,
                                          self.first_bad_step)

    def check(self, last_checkpoint):
        """Raises TrainingDiverged on every rank if any rank saw a non-finite loss."""
        if dist.is_initialized():
            dist.all_reduce(self.first_bad_step, op=dist.ReduceOp.MAX)
        if self.first_bad_step.item():
            raise TrainingDiverged(f"non-finite train loss at step {self.first_bad_step.item()}; last good checkpoint: "
                                   f"{last_checkpoint or 'none'}")


class StopSignal:
    """SIGTERM or SIGINT asks the run to stop after the current step; a second Ctrl-C stops at once.

    `requested()` tells every rank whether any rank was asked, over a CPU (gloo) group so that asking
    every step never waits for the GPU."""

    def __init__(self, device):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and device.type == "cuda" else None

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self):
        flag = torch.tensor([self.signum])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = self.signum or int(flag[0])
        return self.signum
