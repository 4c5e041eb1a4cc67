"""Step 1 at a site: its labelled rows (its partition of the embedded set, or its own file) -> a seeded train /
validation split -> token tensors (tokenised once)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.faults import corrupt_rows
from client.state import site_name
from common.config import AppConfig, DataConfig
from common.datasets import (
    GROUP,
    HELD_OUT,
    LABEL,
    TEXT,
    SiteDataError,
    foreign_rows,
    held_out,
    keyed_share,
    load_drugreview,
    load_embedded,
    load_file,
)
from common.model import Encoded, Split, encode


@dataclass(frozen=True)
class SiteIdentity:
    """Who a site is: its stable name (node ids are random) and, in simulation, its partition."""

    name: str
    partition_id: int
    num_partitions: int
    data_path: str

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteIdentity:
        pid = int(node_config.get("partition-id", 0))
        return cls(
            name=site_name(node_config),
            partition_id=pid,
            num_partitions=int(node_config.get("num-partitions", 1)),
            data_path=str(node_config.get("data-path", "")),
        )


@dataclass(frozen=True)
class SiteData:
    site: SiteIdentity
    train: Encoded
    val: Encoded
    num_classes: int
    fingerprint: str = ""  # of the rows (order-free): keys the site's lifetime ledger (client/state.py)

    def label_counts(self) -> torch.Tensor:
        """Examples per class in the site's own train split: exact, so never released and never inside a DP loss
        (non-DP baselines only)."""
        return torch.bincount(self.train.labels, minlength=self.num_classes).float()


def fingerprint(texts: list[str], labels: np.ndarray) -> str:
    """A digest of a site's labelled rows that ignores their order: the same data, the same lifetime ledger."""
    rows = sorted(hashlib.sha256(f"{label}\x00{text}".encode()).digest() for text, label in zip(texts, labels,
                                                                                               strict=True))
    return hashlib.sha256(b"".join(rows)).hexdigest()


def site_rows(cfg: DataConfig, site: SiteIdentity) -> pd.DataFrame:
    """This site's labelled rows: its partition of the embedded set, or its own file."""
    if cfg.source == "files":
        path = site.data_path or cfg.files.format(site=site.name, partition=site.partition_id)
        if not path:
            raise SiteDataError(f"site {site.name}: data.source is 'files' but the node config has no data-path "
                                "(and data.files sets no template); start the SuperNode with "
                                "--node-config \"data-path='/path/to/data.csv'\"")
        return load_file(path, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.labels,
                         site=site.name)
    frame = pool(cfg.source, cfg.labels, cfg.seed)
    parts = _partitions(cfg.source, cfg.labels, site.num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)
    if not 0 <= site.partition_id < len(parts):
        raise SiteDataError(f"site {site.name}: partition-id {site.partition_id} outside 0..{len(parts) - 1}")
    return frame.iloc[parts[site.partition_id]].reset_index(drop=True)


def _elsewhere(cfg: DataConfig, injected: dict) -> pd.DataFrame | None:
    """The rows an injected domain shift draws from: the embedded pool's (rows of conditions the site does not
    hold), or another embedded workload's with its labels mapped onto this run's by sentiment."""
    if "domain_shift" not in injected:
        return None
    source = injected["domain_shift"]["source"]
    if source:
        return foreign_rows(source, cfg.labels)
    return pool(cfg.source if cfg.source != "files" else "drugreview", cfg.labels, cfg.seed)


@lru_cache(maxsize=4)
def pool(source: str, labels: tuple[str, ...], seed: int) -> pd.DataFrame:
    """The rows an embedded workload shares out among its simulated sites: the drug reviews' train file (the test
    file is the server's), or the movie snippets (debate statements) not held out for the server."""
    if source in HELD_OUT:
        frame = load_embedded(source, labels)
        return frame[~held_out(frame, source, seed)].reset_index(drop=True)
    return load_drugreview("train", labels)


def partition(frame: pd.DataFrame, *, num_sites: int, how: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Row indices of each site, using Flower Datasets' partitioners on an in-memory `datasets.Dataset`.

    natural: sites are groups of whole conditions or movies (clinics that treat different patients, critics'
    circles that review different films: non-IID);
    iid: uniform random; dirichlet: label proportions per site drawn from Dir(alpha).
    """
    # Imported here: datasets pulls in pyarrow and friends, which the server and the dashboard do not need.
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import DirichletPartitioner, GroupedNaturalIdPartitioner, IidPartitioner

    disable_progress_bars()

    ds = Dataset.from_dict({"row": np.arange(len(frame)), LABEL: frame[LABEL].to_numpy(),
                            GROUP: [str(g) for g in frame[GROUP]]})
    if how == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
    elif how == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_sites, partition_by=LABEL, alpha=alpha, seed=seed,
                                           min_partition_size=max(2, len(frame) // (num_sites * 10)))
    elif how == "natural":
        # Sorted conditions, grouped into num_sites groups of whole conditions; conditions are shuffled with the
        # seed first so that the very large "Birth Control" group does not always land on site 0.
        conditions = sorted(set(ds[GROUP]))
        if len(conditions) < num_sites:
            raise ValueError(f"natural partitioning needs at least {num_sites} conditions, the data has {len(conditions)}")
        order = np.random.default_rng(seed).permutation(len(conditions))
        rank = {conditions[i]: r for r, i in enumerate(order)}
        ds = ds.map(lambda row: {GROUP: f"{rank[row[GROUP]]:05d}"})
        partitioner = GroupedNaturalIdPartitioner(partition_by=GROUP, group_size=len(conditions) // num_sites,
                                                  mode="allow-bigger", sort_unique_ids=True)
    else:
        raise ValueError(f"data.partitioner must be natural, iid or dirichlet, got {how!r}")
    partitioner.dataset = ds
    return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(num_sites)]


def split_train_val(texts: list[str], *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation row indices of one site (at least one row in each).

    Each row's side is decided by a keyed hash of its own text, not by a permutation of all rows: adding or removing
    one example then never moves another between the splits. DP-SGD (train split) and the released summaries
    (both splits) are accounted for add/remove-one-example neighbours, and that only holds if the splits are stable.
    """
    u = keyed_share(texts, seed)
    is_val = u < val_fraction
    if len(texts) >= 2 and (is_val.all() or not is_val.any()):
        # A tiny site: keep one row on each side (the lowest hash goes to validation).
        is_val = np.zeros(len(texts), dtype=bool)
        is_val[int(np.argmin(u))] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@lru_cache(maxsize=16)
def _partitions(source: str, labels: tuple[str, ...], num_sites: int, how: str, alpha: float,
                seed: int) -> list[np.ndarray]:
    # Every site computes the same partitioning from the same seed; caching spares it when a process hosts several.
    return partition(pool(source, labels, seed), num_sites=num_sites, how=how, alpha=alpha, seed=seed)


def load_site_data(cfg: AppConfig, site: SiteIdentity, tokenizer, *, faults_allowed: bool = True) -> SiteData:  # noqa: ANN001
    """The site's rows, split (seeded by data.seed and the site's name) and tokenised.

    `faults_allowed`: whether this site applies the run's injected faults (its policy: only simulated sites do; the
    run config is the coordinator's, and a real site's data must not be changed by it).
    """
    rows = site_rows(cfg.data, site)
    injected = cfg.faults_at(site.name) if faults_allowed else {}
    if injected:  # a simulated faulty site (scenario ground truth)
        rows = corrupt_rows(rows, injected, num_classes=len(cfg.data.labels),
                            seed=cfg.data.seed + sum(map(ord, site.name)),
                            elsewhere=_elsewhere(cfg.data, injected))
    if len(rows) < 2:
        raise SiteDataError(f"site {site.name}: fewer than 2 usable rows; expected at least 2 labelled examples")
    seed = cfg.data.seed + sum(map(ord, site.name))
    train_idx, val_idx = split_train_val(rows[TEXT].tolist(), val_fraction=cfg.data.val_fraction, seed=seed)
    texts, labels = rows[TEXT].tolist(), rows[LABEL].to_numpy()
    return SiteData(
        site=site,
        train=encode([texts[i] for i in train_idx], labels[train_idx], tokenizer, cfg.data.max_length),
        val=encode([texts[i] for i in val_idx], labels[val_idx], tokenizer, cfg.data.max_length),
        num_classes=len(cfg.data.labels),
        fingerprint=fingerprint(texts, labels),
    )


def train_loader(data: Split, batch_size: int, seed: int) -> DataLoader:
    """Batches of (*inputs, labels, row index); the index lets training record each example's
    loss at its first use in a round. Opacus replaces the sampler with Poisson sampling of the same expected batch
    size (sample_rate = 1 / len(loader))."""
    dataset = TensorDataset(*data.inputs(), data.labels, torch.arange(len(data)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
