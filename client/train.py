"""Step 2 at a site: the local fine-tuning loop, DP-SGD through Opacus (or the same loop without it)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.data import train_loader
from client.noise import PoissonSampler, Randomness, SiteRandom, use_randomness
from client.privacy import Schedule
from common.config import DPConfig, TrainConfig
from common.diagnostics import GRAD_EDGES, loss_blocks
from common.model import Features, Split, head, linear_head, logits

# Opacus's hooks fire on frozen embeddings whose inputs need no gradient; PyTorch warns each step, harmlessly.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

FEATURE_BATCH = 8192  # rows of features per forward / backward pass (head mode)


@dataclass(frozen=True)
class TrainHealth:
    """How the round's local training went at this site (exact; released only inside the noised summary).

    The gradient statistics are averaged over the round's noised steps and the losses are taken once per example,
    so one example moves each by at most 1 (see common/diagnostics). Reading them off the training pass itself
    spares the summary a forward pass over the train split.
    """

    grad_norm_hist: list[float]  # examples per bin of per-sample gradient norm / C (diagnostics.GRAD_EDGES); DP only
    clipped_sum_norm: float  # ‖Σ clipped per-sample gradients‖ / C of a step (before noise); DP only
    train_loss_sum: float = 0.0  # Σ min(loss, L) / L, each example's loss at its first use in the round
    train_loss_hist: list[float] = field(default_factory=list)  # examples per loss bin over [0, L]
    # [K][K] train examples per (given label, the received model's prediction at their first use)
    train_confusion: list[list[float]] = field(default_factory=list)
    # [K][H] Σ of unit-norm head inputs per class the received model predicts, at first use (the same pass)
    train_embedding: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0  # spent computing these (the diagnostics' cost inside training)


class _HealthMeter:
    """Reads Opacus's per-sample gradients before each step clips them, and the clipped sum before noise."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.c = max_grad_norm
        self.edges = torch.tensor(GRAD_EDGES[1:-1])
        self.step_hist = torch.zeros(len(GRAD_EDGES) - 1)
        self.hist = torch.zeros(len(GRAD_EDGES) - 1)
        self.signal, self.steps = 0.0, 0
        self.seconds = 0.0

    @torch.no_grad()
    def after_backward(self) -> None:
        t0 = time.perf_counter()
        squares = None
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                continue
            sq = gs.reshape(gs.shape[0], -1).float().pow(2).sum(dim=1)
            squares = sq if squares is None else squares + sq
        if squares is not None:
            idx = torch.bucketize(squares.sqrt().cpu() / self.c, self.edges, right=True)
            self.step_hist += torch.bincount(idx, minlength=len(self.step_hist)).float()
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def after_step(self, optimizer) -> None:  # noqa: ANN001
        if getattr(optimizer, "_is_last_step_skipped", False):
            return  # a partial (physical) batch: the logical step goes on
        t0 = time.perf_counter()
        total = sum(float(p.summed_grad.float().pow(2).sum()) for p in self.params
                    if getattr(p, "summed_grad", None) is not None)
        self.signal += total ** 0.5 / self.c
        self.hist += self.step_hist
        self.step_hist.zero_()
        self.steps += 1
        self.seconds += time.perf_counter() - t0

    def result(self) -> tuple[list[float], float]:
        """(step-averaged gradient-norm histogram, step-averaged ‖Σ clipped‖ / C)."""
        return (self.hist / self.steps).tolist(), self.signal / self.steps


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps taken (what the accountant counts)
    sample_rate: float  # Poisson sampling rate q (1 / batches per epoch); 0 without DP
    noise_multiplier: float  # σ used; 0 without DP
    mean_loss: float  # local only: never released as such (it is not noised)
    step_seconds: list[float] = field(default_factory=list)
    health: TrainHealth | None = None


def balanced_loss(logits: torch.Tensor, labels: torch.Tensor, *, mode: str,
                  prior: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, countering class imbalance as `mode` says; always a true mean over the batch.

    `prior` is a class distribution that is public or already paid for (the run's released label counts, the
    server's labelled data, or the config: client/census.py), never this site's exact label counts. Inside every
    example's loss, exact counts would make one example's presence move all the *others'* clipped gradients, and
    the sensitivity of the clipped sum would no longer be C (measured: 1.37·C from one rare-class example).

    logit-adjust (Menon et al., 2021): train on logits + log(prior), predict with the plain logits. The prior shifts
    the decision boundary towards rare classes by changing each example's gradient *direction*, which survives
    DP-SGD's per-example clipping. weights: w_y = 1 / (K · prior_y) on each example's loss; under DP, clipping every
    example's gradient to the same norm largely cancels it. Opacus's loss_reduction="mean" assumes a plain mean
    over the batch, hence reduction="none" + .mean() (nn.CrossEntropyLoss(weight=...) would divide by Σw).
    """
    if mode == "none" or prior is None:
        return nn.functional.cross_entropy(logits, labels)
    k = logits.shape[-1]
    if mode == "logit-adjust":
        return nn.functional.cross_entropy(logits + prior.log(), labels)
    weights = (1.0 / (k * prior)).clamp(max=10.0)
    return (nn.functional.cross_entropy(logits, labels, reduction="none") * weights[labels]).mean()


def prior_from_counts(counts) -> torch.Tensor:  # noqa: ANN001
    """A smoothed class distribution from (possibly noised) counts: negative noised cells count as 0, and a class
    with none is rare, not impossible."""
    c = torch.as_tensor(counts, dtype=torch.float32).clamp(min=0.0)
    return (c + 1.0) / (c.sum() + len(c))


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, head_only: bool = False) -> torch.optim.Optimizer:
    """Two learning rates: the classification head learns from scratch, the encoder is only nudged (`head_only`:
    `model` is the head itself, all at train.head-lr).

    The optimizer is new each round (its state never leaves the site and is not averaged). AdamW's first steps
    are nearly sign(g), so under DP noise with a few steps per round every coordinate moves a full step in a random
    direction; plain SGD lets the noise average out over steps and rounds.
    """
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if head_only or "classifier" in name else body).append(p)
    groups = [g for g in ({"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups)
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_local(model: nn.Module, data: Split, *, train_cfg: TrainConfig, dp_cfg: DPConfig,
                noise_multiplier: float, prior: torch.Tensor | None, seed: int, schedule: Schedule | None = None,
                rng: Randomness | None = None) -> TrainResult:
    """Fine-tune `model` in place on one site's train split for `train_cfg.local_epochs` epochs (`data` as
    Features: its head alone, on the frozen encoder's cached output; head mode).

    With dp_cfg.enabled, every step goes through Opacus: Poisson sampling at `schedule.sample_rate`, per-sample
    clipping at dp_cfg.max_grad_norm, Gaussian noise of std noise_multiplier · max_grad_norm, and the noised sum
    divided by `schedule.expected_batch`; exactly `schedule.steps` steps, an empty Poisson batch still being a noised
    step. The schedule comes from public numbers (the released size), so nothing about the step count or the
    update's scale depends on the exact data. Noise and sampling draw from `rng` (default: a fresh OS-keyed
    generator, client/noise.py); `seed` seeds only the non-private parts (the non-DP shuffle, dropout).
    The caller records (σ, q, steps) in the site's ledger.

    The training-pass summary blocks (TrainHealth) are functions of released iterates only: each example's
    first-use loss and prediction come from a forward pass at the received global model in eval mode, before any
    step (one example moves one cell of each), and the gradient statistics describe DP-SGD iterates at q = 1. At
    q < 1 those would depend on the secret Poisson mask, so they are not measured.
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    dev = next(model.parameters()).device
    on_features = isinstance(data, Features)
    module = head(model) if on_features else model  # what the privacy engine hooks and the optimizer steps
    # A linear head's per-sample gradients are tiny: whole batches of features fit in one pass.
    physical = max(train_cfg.max_physical_batch, FEATURE_BATCH) if on_features else train_cfg.max_physical_batch
    # Dropout masks are drawn in sequence over the batch, so with a public seed one example more shifts every other
    # example's mask and moves their clipped gradients (measured: the clipped sum by 5·C on MiniLM). Under DP they
    # come from a secret seed: each example's mask is then independent of the others', as DP-SGD's bound needs.
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if dp_cfg.enabled else seed)
    model.train()
    optimizer = make_optimizer(module, train_cfg, head_only=on_features)
    first_loss = torch.full((len(data),), float("nan"))  # each example's plain CE at its first use this round
    first_pred = torch.full((len(data),), -1, dtype=torch.long)  # and the class it predicted then
    # Each example's loss and prediction at the received model, in eval mode, before any step: a function of that
    # model and the example alone (in train mode dropout masks would enter, and at q < 1 the Poisson mask would).
    classes, embedding = _first_losses(model, data, first_loss, first_pred, physical)
    hooks, meter = None, None
    if dp_cfg.enabled:
        if schedule is None:
            raise ValueError("DP training needs its schedule (privacy.dpsgd_schedule of the released size)")
        rng = rng or SiteRandom()
        loader = _poisson_loader(data, schedule, rng)
        with warnings.catch_warnings():
            # "Secure RNG turned off": Opacus's secure mode needs torchcsprng (no build for torch 2.x); the noise
            # and the sampling come from client/noise.py instead.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant="rdp")
            # wrap_model=False hooks the model itself, so state-dict keys stay plain for the weights that travel.
            # poisson_sampling=False: the loader already samples (from `rng`, at the public rate).
            hooks, optimizer, loader = engine.make_private(
                module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                max_grad_norm=dp_cfg.max_grad_norm, poisson_sampling=False, grad_sample_mode=dp_cfg.grad_sample_mode,
                wrap_model=False, loss_reduction="mean",
            )
        optimizer.expected_batch_size = schedule.expected_batch  # Opacus would use int(n · q): the exact size
        use_randomness(optimizer, rng)
        if schedule.sample_rate >= 1.0:
            meter = _HealthMeter(module, dp_cfg.max_grad_norm)
    else:
        loader = train_loader(data, train_cfg.batch_size, seed)

    losses: list[float] = []
    step_seconds: list[float] = []
    steps = 0
    trainable = [p for p in module.parameters() if p.requires_grad]
    prior = None if prior is None else prior.to(dev)
    try:
        for _ in range(train_cfg.local_epochs):
            # DP: BatchMemoryManager splits a Poisson batch above max_physical_batch, and the DP optimizer only
            # steps at the end of each logical batch. Without DP the same cap is kept by accumulating gradients over
            # chunks of the batch, then stepping once.
            ctx = (BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                      optimizer=optimizer) if hooks is not None else _Plain(loader))
            with ctx as batches:
                for *inputs, labels, _index in batches:
                    n = labels.numel()
                    t0 = time.perf_counter()
                    if n == 0:
                        if hooks is None:
                            continue
                        # An empty Poisson batch is still a step of the mechanism: noise alone, counted.
                        for p in trainable:
                            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    size = max(n, 1) if hooks is not None else physical
                    for start in range(0, n, size):
                        part = slice(start, start + size)
                        y = labels[part].to(dev)
                        out = logits(model, tuple(x[part].to(dev) for x in inputs))  # [b, K]
                        loss = balanced_loss(out, y, mode=train_cfg.class_balance, prior=prior)
                        # Chunks of one logical batch add up to its mean loss (DP batches come whole: weight 1).
                        (loss * (y.numel() / n)).backward()
                        losses.append(loss.item())
                        if meter is not None:
                            meter.after_backward()
                    optimizer.step()
                    if meter is not None:
                        meter.after_step(optimizer)
                    if not getattr(optimizer, "_is_last_step_skipped", False):
                        steps += 1  # a logical step (a physical chunk of a larger batch is not one)
                    optimizer.zero_grad(set_to_none=True)
                    step_seconds.append(time.perf_counter() - t0)
    finally:
        if hooks is not None:
            hooks.cleanup()  # the same model gets hooks again next round
    if hooks is not None and steps != schedule.steps:
        raise RuntimeError(f"DP-SGD took {steps} steps; its schedule (and the ledger) says {schedule.steps}")
    return TrainResult(steps=steps, sample_rate=schedule.sample_rate if hooks is not None else 0.0,
                       noise_multiplier=noise_multiplier if hooks is not None else 0.0,
                       mean_loss=float(sum(losses) / max(1, len(losses))), step_seconds=step_seconds,
                       health=_health(meter, first_loss.numpy(), first_pred.numpy(), data.labels.numpy(),
                                      dp_cfg.loss_clip, num_classes=classes, embedding=embedding))


def _poisson_loader(data: Split, schedule: Schedule, rng: Randomness) -> DataLoader:
    """Batches of (*inputs, labels, row index), Poisson-sampled at the public rate from `rng`;
    empty batches come as zero-length tensors (Opacus's collate)."""
    from opacus.data_loader import wrap_collate_with_empty
    from torch.utils.data._utils.collate import default_collate

    dataset = TensorDataset(*data.inputs(), data.labels, torch.arange(len(data)))
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *x.shape) for x in first],
                                      dtypes=[x.dtype for x in first])
    sampler = PoissonSampler(num_samples=len(data), sample_rate=schedule.sample_rate,
                             steps=schedule.steps_per_epoch, rng=rng)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


@torch.no_grad()
def _first_losses(model: nn.Module, data: Split, first_loss: torch.Tensor, first_pred: torch.Tensor,
                  batch: int) -> tuple[int, np.ndarray]:
    """Every train example's loss and prediction at the received model, in eval mode, before any step; returns the
    number of classes and the train_embedding block: per predicted class, the sum of the examples' head inputs
    scaled to unit norm (each example adds one unit vector to one row)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pooled: list[torch.Tensor] = []
    # On tokens the head's input is the pooled encoder output, read on its way in; on features it is the input.
    # A model without one linear head over a pooled vector (the privacy audit's bag of embeddings, RoBERTa's head
    # over token states) has no such input: the block has width 0.
    on_features = isinstance(data, Features)
    target = None if on_features else linear_head(model)
    hook = target.register_forward_pre_hook(lambda _m, args: pooled.append(args[0].detach().float())) \
        if target is not None else None
    sums = None
    try:
        for start in range(0, len(data), batch):
            idx = torch.arange(start, min(start + batch, len(data)))
            inputs = tuple(x[idx].to(dev) for x in data.inputs())
            out = logits(model, inputs)
            _record_first(first_loss, first_pred, idx, out, data.labels[idx].to(dev))
            x = inputs[0].float() if on_features else pooled.pop() if hook is not None \
                else torch.zeros(len(idx), 0, device=dev)
            if x.dim() != 2 or len(x) != len(idx):
                x = torch.zeros(len(idx), 0, device=dev)
            unit = nn.functional.normalize(x, dim=-1)  # a zero vector stays 0: it adds nothing
            if sums is None:
                sums = torch.zeros(out.shape[-1], unit.shape[-1], dtype=torch.float64, device=dev)
            sums.index_add_(0, out.argmax(dim=-1), unit.double())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if sums is None:
        return 0, np.zeros((0, 0))
    return int(sums.shape[0]), sums.cpu().numpy()


@torch.no_grad()
def _record_first(first_loss: torch.Tensor, first_pred: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                  labels: torch.Tensor) -> None:
    ce = nn.functional.cross_entropy(out.detach().float(), labels, reduction="none").cpu()
    fresh = first_loss[index].isnan()
    first_loss[index[fresh]] = ce[fresh]
    first_pred[index[fresh]] = out.detach().argmax(dim=-1).cpu()[fresh]


def _health(meter: _HealthMeter | None, first_loss, first_pred, labels, loss_clip: float, *,  # noqa: ANN001
            num_classes: int, embedding: np.ndarray) -> TrainHealth:
    t0 = time.perf_counter()
    loss_sum, loss_hist = loss_blocks(first_loss, loss_clip)
    seen = first_pred >= 0
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels[seen], first_pred[seen]), 1.0)
    grad = meter.result() if meter is not None and meter.steps else None
    return TrainHealth(
        grad_norm_hist=list(grad[0]) if grad else [], clipped_sum_norm=grad[1] if grad else 0.0,
        train_loss_sum=loss_sum, train_loss_hist=loss_hist.tolist(), train_confusion=confusion.tolist(),
        train_embedding=embedding.tolist(),
        seconds=(meter.seconds if meter is not None else 0.0) + time.perf_counter() - t0)


class _Plain:
    """The non-DP path's stand-in for BatchMemoryManager: yields the loader as it is."""

    def __init__(self, loader) -> None:  # noqa: ANN001
        self.loader = loader

    def __enter__(self):  # noqa: ANN204
        return self.loader

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        return None
