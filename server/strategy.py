"""Step 4: the round loop. Exchange with the sites -> collect their replies -> aggregate (server/aggregate.py) -> one typed RoundRecord per round (common/rounds.py), committed in one store transaction."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import diagnostics, records
from common.checkpoints import Checkpoints
from common.config import ServerConfig
from common.log import get_logger
from common.rounds import LEFT_OUT, Event, LedgerRow, RoundRecord, SiteRoundRow
from common.run_store import RunWriter
from server.aggregate import (
    Arrays,
    Updates,
    aggregate,
    caps,
    check_update,
    noise_scale,
    update_geometry,
    update_norm,
)
from server.central_eval import CentralEval, Probe
from server.findings import Diagnosis, FindingsTracker
from server.findings.cross_site import cross_site
from server.identity import Identities, Node, load_registry
from server.prior import LabelCounts

log = get_logger()
T = TypeVar("T")
MIN_SITES_FOR_MEDIAN = 3  # updates a round needs before one can be judged against their median norm
POLL_MIN = 0.005  # seconds between polls for replies right after one arrived (then doubling up to poll_interval)


@dataclass
class SiteReply:
    node_id: int
    site: str
    message: Message | None  # None: no reply before the timeout


class DebugFedAvg:
    """FedAvg (or a robust rule) over the travelling weights, plus the debugging record of every site in every round.

    The round loop is written out (as Flower's `Strategy.start` is) so that each round's train results, evaluation
    summaries, failures and central test metrics are committed together, and so that every failed, silent or refused
    site is recorded under its site name with its reason while the round goes on with the others. `cfg` is the
    run's `server` section; the rest is what the loop needs from the other sections and the server's own data.
    """

    def __init__(self, cfg: ServerConfig, *, writer: RunWriter, loss_clip: float, class_names: tuple[str, ...] = (),
                 class_prior: str | list[float] | None = "released", central_eval: CentralEval | None = None,
                 probe: Probe | None = None, checkpoints: Checkpoints | None = None,
                 poll_interval: float = 0.05, plain_sgd: bool = False) -> None:
        self.cfg = cfg
        # The sites step with plain SGD (train.optimizer): each update's step size can be read off its DP noise.
        self.plain_sgd = plain_sgd
        self.writer = writer
        self.central_eval = central_eval
        self.poll_interval = poll_interval
        # Which node holds which site name (node ids are random; names are stable), bound to the node's key where the
        # link knows it (server/identity.py).
        self.ids = Identities(load_registry(cfg.site_registry) if cfg.site_registry else None)
        self.num_classes = len(class_names) or None  # every census and summary must be over these K classes
        self.known: set[str] = set()  # site names already in the store
        self.declared: dict[str, int] = {}  # site -> train examples it declared when it joined (caps its weight)
        # The engineer's fix: sites not asked to train (server.exclude), and multipliers on the others' example
        # counts (server.weights).
        self.weights = cfg.site_weights()
        self.probe = probe
        self.loss_clip = loss_clip
        self.checkpoints = checkpoints
        # Findings name classes as the engineer configured them (data.labels), not by index.
        self.findings = FindingsTracker(Diagnosis(loss_clip=loss_clip, class_names=tuple(class_names) or None))
        self.run_id = writer.run_id  # sent with every instruction: sites key their run state and charges by it
        # Confident-learning thresholds sent with each evaluation: from the previous round's noised summaries.
        self.thresholds: list[float] | None = None
        # The loss's class prior sent with each train instruction: "released" (the sites' census and summaries,
        # pooled: server/prior.py), fixed weights, or None (plain cross-entropy).
        self.class_prior = class_prior
        self.label_counts = LabelCounts(cfg.max_weight_ratio)  # one site's counts bounded as its FedAvg weight is
        self.pending_ledger: list[LedgerRow] = []  # census releases charged to this run, filed with the next round

    # --- messaging ---------------------------------------------------------------------------------------------

    def _exchange(self, grid: Grid, node_ids: list[int], content: RecordDict, message_type: str) -> list[SiteReply]:
        """Send one message per node and collect the replies, keyed by the message each answers.

        Mapping through reply_to_message_id matters: an error reply for a dead node comes from the SuperLink,
        so its src_node_id is not the node's.
        """
        messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in node_ids]
        ids = list(grid.push_messages(messages))
        node_of = dict(zip(ids, node_ids, strict=True))
        got: dict[str, Message] = {}
        deadline = time.time() + self.cfg.round_timeout
        # Poll fast right after a reply, backing off to poll_interval (50 ms) while nothing comes. A fixed 0.2 s
        # sleep made every phase end on a 0.2 s boundary (measured: ~0.2 s of a 1.6 s tiny-model round;
        # docs/PERFORMANCE.md).
        wait = POLL_MIN
        while len(got) < len(ids) and time.time() < deadline:
            before = len(got)
            for m in grid.pull_messages([i for i in ids if i not in got]):
                got[m.metadata.reply_to_message_id] = m
            if len(got) < len(ids):
                wait = POLL_MIN if len(got) > before else min(wait * 2, self.poll_interval)
                time.sleep(wait)
        return [SiteReply(node_of[i], self.ids.name_of.get(node_of[i], f"node-{node_of[i]}"), got.get(i)) for i in ids]

    def _wait_for_sites(self, grid: Grid) -> list[int]:
        """The connected nodes, once there are server.min-sites of them.

        Flower's own sampling waits forever without a word; here the wait is an event in the store after 10 s (the
        dashboard shows it) and the run fails with the reason after server.wait-for-sites seconds.
        """
        start, announced = time.time(), False
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= self.cfg.min_sites:
                self.ids.forget(set(self.ids.name_of) - set(node_ids))  # a site back under a new node id
                self._learn_nodes(grid, node_ids)
                if announced:
                    self.writer.event(Event("sites-connected", f"{len(node_ids)} sites connected after "
                                                                f"{time.time() - start:.0f} s"))
                return node_ids
            waited = time.time() - start
            if waited >= self.cfg.wait_for_sites:
                raise TimeoutError(f"only {len(node_ids)} site(s) connected after {waited:.0f} s; server.min-sites "
                                   f"is {self.cfg.min_sites} (server.wait-for-sites = {self.cfg.wait_for_sites:g} s)")
            if waited >= 10 and not announced:
                announced = True
                self.writer.event(Event("waiting-for-sites", f"waiting for sites: {len(node_ids)} connected, "
                                                              f"server.min-sites = {self.cfg.min_sites}"))
                log.info("waiting for sites: %d connected, server.min-sites = %d", len(node_ids),
                         self.cfg.min_sites)
            time.sleep(1.0)

    def _learn_nodes(self, grid: Grid, node_ids: list[int]) -> None:
        """What the link says of each new node (registered name, public key); a grid without it (simulation, an
        older link) leaves names bound to first use."""
        if all(n in self.ids.nodes for n in node_ids) or not hasattr(grid, "get_nodes"):
            return
        try:
            self.ids.learn(Node(int(n.node_id), str(n.name), bytes(n.public_key)) for n in grid.get_nodes())
        except Exception as e:  # noqa: BLE001 -- the link's node listing is advisory where no registry is set
            log.warning("could not list the link's nodes (%s: %s); site names bind to their first use",
                        type(e).__name__, e)

    def hello(self, grid: Grid) -> None:
        """Learn each node's site name and data size (a query message); a site whose data fails is recorded."""
        node_ids = self._wait_for_sites(grid)
        for r in self._exchange(grid, node_ids, records.pack_instruction(None, 0, 0, run_id=self.run_id),
                                MessageType.QUERY):
            if r.message is None or r.message.has_error():
                self.writer.event(Event("site-failed", f"{r.site} failed to start: {_reason(r)}", r.site))
                continue
            try:
                info = records.unpack_site(r.message.content, self.num_classes)
            except Exception as e:  # noqa: BLE001 -- no reply may end the run
                self.writer.event(Event("site-failed", f"{r.site} failed to start: malformed reply: {e}", r.site))
                continue
            problem = self.ids.check(r.node_id, info.name)
            if problem:
                self.writer.event(Event("site-impersonation", f"refused: {problem}", r.site))
                continue
            if info.status == records.STATUS_FAILED:
                # Named (ids.check bound it), so that its failures in every round are filed under the site.
                self.writer.event(Event("site-failed", f"{info.name} failed to start: {info.reason}", info.name))
                continue
            try:
                self._register(info)
            except Exception as e:  # noqa: BLE001 -- no reply may end the run
                log.exception("%s's hello could not be used", info.name)
                self.writer.event(Event("site-failed", f"{info.name} failed to start: its reply could not be used: "
                                                       f"{type(e).__name__}: {e}", info.name))
                continue
            if info.status == records.STATUS_REFUSED:  # its own policy: it will refuse every round, and says why
                self.writer.event(Event("site-refused", f"{info.name} refuses this run: {info.reason}", info.name))

    def _register(self, info: records.SiteInfo) -> None:
        """A site seen for the first time (at start or joining later) is recorded, with its census (released sizes
        and train-label counts); its name is already bound to its node (ids.check)."""
        self.declared.setdefault(info.name, info.n_train)
        if info.census_labels and info.name not in self.label_counts.precision:
            self.label_counts.add(info.name, np.asarray(info.census_labels), info.census_noise)
            if info.census_run == self.run_id and info.census_noise > 0:
                # This run paid for the census: it is in the run's ledger (report --json recomposes ε from it).
                self.pending_ledger.append(LedgerRow(info.name, 0, "census", "gaussian", info.census_noise, 1.0, 1,
                                                     1.0))
        if info.name not in self.known:
            self.known.add(info.name)
            self.writer.add_site(info.name, n_train=info.n_train, n_val=info.n_val)
            self.writer.event(Event("site-joined", f"{info.name} joined with {info.n_train} train and "
                                                   f"{info.n_val} validation examples", info.name))

    def _sample(self, grid: Grid) -> list[int]:
        node_ids = [n for n in self._wait_for_sites(grid) if self.ids.name_of.get(n) not in self.cfg.exclude]
        k = max(int(len(node_ids) * self.cfg.fraction_train), self.cfg.min_sites)
        if k >= len(node_ids):
            return node_ids
        return sorted(np.random.default_rng().choice(node_ids, size=k, replace=False).tolist())

    # --- the round loop ----------------------------------------------------------------------------------------

    def restore(self, sites: list[str], thresholds: list[float] | None, label_counts: dict | None = None,
                rounds: list[RoundRecord] | None = None) -> None:
        """Resuming a run: the sites already in the store, the thresholds and label-count estimates the last
        completed round left, and the committed rounds themselves, from which the findings tracker rebuilds its
        evidence, baselines and open findings."""
        self.known.update(sites)
        self.thresholds = thresholds
        self.label_counts = LabelCounts.from_state(label_counts, self.cfg.max_weight_ratio)
        self.findings.replay(rounds or [])

    def prior(self) -> list[float] | None:
        """The class prior for this round's training (public: config, server data, or released counts)."""
        if self.class_prior == "released":
            return self.label_counts.prior()
        return self.class_prior if isinstance(self.class_prior, list) else None

    def run(self, grid: Grid, initial: Arrays, num_rounds: int, *, start_round: int = 1,
            on_round: Callable[[int, Arrays], None] | None = None) -> Arrays:
        """Train rounds start_round..num_rounds from `initial` (the global model after start_round - 1); returns
        the final global weights."""
        self.hello(grid)
        arrays = initial
        if self.checkpoints is not None and start_round == 1:
            self.checkpoints.save(0, initial, {})
        for rnd in range(start_round, num_rounds + 1):
            t0 = time.time()
            log.info("[ROUND %d/%d]", rnd, num_rounds)
            rec = RoundRecord(round=rnd, seconds=0.0)
            rec.ledger.extend(self.pending_ledger)
            self.pending_ledger = []

            # --- training at the sites -------------------------------------------------------------------------
            replies = self._exchange(grid, self._sample(grid),
                                     records.pack_instruction(arrays, rnd, num_rounds, run_id=self.run_id,
                                                              class_prior=self.prior()),
                                     MessageType.TRAIN)
            rec.metrics["train_wall"] = time.time() - t0
            updates = self._collect_train(replies, arrays, rec)
            # Diagnostics work: each local model on the public probe texts, the updates' geometry (counted with the
            # rest below).
            t_probe = time.perf_counter()
            if self.probe is not None:
                for row in rec.sites:
                    if row.phase == "train" and row.site in updates:
                        row.probe = [round(v, 4) for v in self.probe(updates[row.site][0])]
            geometry = update_geometry({site: u[0] for site, u in updates.items()}, arrays)
            for row in rec.sites:
                if row.phase == "train" and row.site in geometry:
                    row.update_cosine, row.update_cosine_median = geometry[row.site]
            probe_seconds = time.perf_counter() - t_probe
            if updates:
                arrays, scores = aggregate(updates, self.cfg.aggregation, trim_fraction=self.cfg.trim_fraction,
                                           byzantine=self.cfg.byzantine)
                for row in rec.sites:
                    if row.phase == "train" and row.site in scores:
                        row.aggregation_score = scores[row.site]
            else:
                # Nothing to aggregate: keep the previous global model and say so.
                rec.events.append(Event("round-skipped", f"round {rnd}: no site returned usable weights; "
                                                         "the global model is unchanged"))

            # --- evaluation at the sites (noised summaries) ----------------------------------------------------
            t_eval = time.time()
            replies = self._exchange(grid, self._wait_for_sites(grid),
                                     records.pack_instruction(
                                         arrays, rnd, num_rounds, self.thresholds, self.run_id,
                                         local_models={site: u[0] for site, u in updates.items()}
                                         if self.cfg.cross_site_eval and len(updates) >= 2 else None),
                                     MessageType.EVALUATE)
            rec.metrics["evaluate_wall"] = time.time() - t_eval
            t_diag = time.perf_counter()
            rec.metrics.update(self._collect_evaluate(replies, rec, trainable_values=sum(a.size for a in arrays.values())))

            # --- evaluation at the server (held-out test set) --------------------------------------------------
            central_seconds = 0.0
            if self.central_eval is not None:
                t_central = time.perf_counter()
                held = self.central_eval(arrays)  # the test part's metrics, and the validation part's as val_*
                rec.metrics.update({(f"server_{k}" if k.startswith("val_") else f"test_{k}"): v
                                    for k, v in held.items()})
                central_seconds = time.perf_counter() - t_central

            if self.checkpoints is not None:
                # Before the commit: a committed round has its weights, and what a resumed run needs to go on.
                self.checkpoints.save(rnd, arrays, updates, {"thresholds": self.thresholds,
                                                             "label_counts": self.label_counts.to_state()})
            rec.findings = self._diagnose(rec)
            # The server's diagnostics work: deriving every summary, the global view, the findings.
            rec.metrics["diagnostics_seconds"] = time.perf_counter() - t_diag - central_seconds + probe_seconds
            rec.seconds = time.time() - t0
            self.writer.write_round(rec)
            if self.checkpoints is not None:
                self.checkpoints.prune(rnd)
            log.info("round %d: %s", rnd, {k: round(v, 4) for k, v in rec.metrics.items() if v is not None})
            if on_round is not None:
                on_round(rnd, arrays)
        return arrays

    def _diagnose(self, rec: RoundRecord) -> list:
        """The round's findings; the diagnosis reads what the sites released, so a failure there is recorded as an
        event and the round is committed without findings rather than lost."""
        try:
            return self.findings.update(rec)
        except Exception as e:  # noqa: BLE001
            log.exception("round %d: the diagnosis failed", rec.round)
            rec.events.append(Event("diagnosis-failed", f"round {rec.round}: the findings could not be computed: "
                                                        f"{type(e).__name__}: {e}"))
            return []

    def _failed(self, r: SiteReply, phase: str, rec: RoundRecord, reason: str = "",
                kind: str = "site-failed") -> None:
        """Record a site that raised, stayed silent or answered something unusable; the round goes on."""
        reason = reason or _reason(r)
        rec.sites.append(SiteRoundRow(site=r.site, phase=phase, status="failed", reason=reason))
        rec.events.append(Event(kind, f"{r.site} failed in {phase}: {reason}", r.site))

    def _each(self, replies: list[SiteReply], phase: str, rec: RoundRecord, unpack: Callable[[RecordDict], T],
              use: Callable[[SiteReply, T], None]) -> None:
        """`use(reply, its unpacked content)` for every site that answered something readable under its own name.

        A silent site, an error, a malformed reply (records.Malformed names what is wrong), a node answering under a
        name it does not hold (server/identity.py), and any exception while one reply is used make that site
        failed for the phase, with the reason; whatever the failed `use` had added to the round is taken back
        (`use` changes the server's own state only as its last step). No reply can end the run.
        """
        for r in replies:
            if r.message is None or r.message.has_error():
                self._failed(r, phase, rec)
                continue
            try:
                content = unpack(r.message.content)
            except Exception as e:  # noqa: BLE001 -- anything a reply can make the decoder raise is the reply's fault
                self._failed(r, phase, rec, f"malformed reply: {e}")
                continue
            problem = self.ids.check(r.node_id, content.site.name)  # type: ignore[attr-defined]
            if problem:
                self._failed(r, phase, rec, f"identity refused: {problem}", kind="site-impersonation")
                continue
            mark = len(rec.sites), len(rec.events), len(rec.ledger)
            try:
                use(r, content)
            except Exception as e:  # noqa: BLE001
                log.exception("%s's %s reply could not be used", r.site, phase)
                del rec.sites[mark[0]:], rec.events[mark[1]:], rec.ledger[mark[2]:]
                self._failed(r, phase, rec, f"reply could not be used: {type(e).__name__}: {e}")

    def _collect_train(self, replies: list[SiteReply], global_arrays: Arrays,
                       rec: RoundRecord) -> Updates:
        """site -> (accepted weights, examples); every other reply is recorded with its reason."""
        updates: Updates = {}
        self._each(replies, "train", rec,
                   lambda c: records.unpack_train_reply(c, like=global_arrays, num_classes=self.num_classes),
                   lambda r, tr: self._take_update(tr, global_arrays, rec, updates))
        self._leave_out_outliers(updates, rec)
        if self.cfg.quarantine:
            self._quarantine(updates, rec)
        self._cap_weights(updates, rec)
        # The engineer's multipliers (server.weights) apply after the cap, which bounds only what a site claims.
        return {site: (arrays, n * self.weights.get(site, 1.0)) for site, (arrays, n) in updates.items()}

    def _take_update(self, tr: records.TrainReply, global_arrays: Arrays, rec: RoundRecord,
                     updates: Updates) -> None:
        """One site's train reply: its row, its ledger entry, and its update when it passes the checks."""
        row = _row("train", tr, epsilon_budget=tr.epsilon_budget if tr.epsilon >= 0 else None, delta=tr.delta,
                   sample_rate=tr.sample_rate, steps=tr.steps)
        update = None
        if tr.site.status != records.STATUS_OK or tr.arrays is None:
            rec.events.append(Event("site-refused", tr.site.reason, tr.site.name))
        else:
            if tr.epsilon >= 0 and tr.steps > 0:
                # The site trained and charged its ledger; the server keeps the same entry for the report.
                rec.ledger.append(LedgerRow(tr.site.name, rec.round, "dpsgd", "subsampled-gaussian",
                                            tr.noise_multiplier, tr.sample_rate, tr.steps, tr.sensitivity))
            problem = check_update(tr.arrays, global_arrays) or self._check_weight(tr)
            norm = update_norm(tr.arrays, global_arrays) if not problem else None
            limit = self.cfg.max_update_norm
            if norm is not None and limit > 0 and not norm <= limit:
                problem = (f"update norm {norm:.3g} exceeds server.max-update-norm {limit:g} "
                           "(a scaled or diverged update would dominate the average)")
            if problem:
                row.status, row.reason = "failed", f"update rejected: {problem}"
                rec.events.append(Event("update-rejected", f"{tr.site.name}: {problem}", tr.site.name))
            else:
                row.update_norm = norm
                if self.plain_sgd:
                    row.noise_scale = noise_scale(
                        tr.arrays, global_arrays, noise_multiplier=tr.noise_multiplier,
                        max_grad_norm=tr.sensitivity, steps=tr.steps,
                        expected_batch=tr.sample_rate * tr.num_examples)
                if self.weights.get(tr.site.name, 1.0) > 0:
                    update = (tr.arrays, tr.num_examples)
        rec.sites.append(row)
        # The server's own state changes last: a reply that failed above left none behind.
        self._register(tr.site)
        if update is not None:
            updates[tr.site.name] = update

    def _leave_out_outliers(self, updates: Updates, rec: RoundRecord) -> None:
        """Norm bounding: an update longer than server.update-norm-outlier × the round's median update norm leaves
        the average (in place). Its row stays ok, with the reason: the site trained, charged its ε and released its
        summary, and the findings still read its norm, schedule and summary (a diverging or overfitting site is
        named for what it did); the probe and update geometry, which read the averaged updates, skip it. Averaged
        in, one site's 371 local passes (norm 450× the others') held the global model at 52–58 % test accuracy on
        the movies (74–76 % with it left out), and with it every per-class reading of the other sites' labels. The
        median is the round's: where half the sites send outliers it moves with them, and none is left out."""
        factor = self.cfg.update_norm_outlier
        rows = [r for r in rec.sites if r.phase == "train" and r.status == "ok" and r.site in updates
                and r.update_norm is not None]
        if factor <= 0 or len(rows) < MIN_SITES_FOR_MEDIAN:
            return
        median = statistics.median(r.update_norm for r in rows)
        for r in rows:
            if median > 0 and r.update_norm > factor * median:
                self._leave_out(r, updates, rec, f"its update norm {r.update_norm:.3g} is "
                                f"{r.update_norm / median:.0f}× the round's median {median:.3g} "
                                f"(server.update-norm-outlier {factor:g})")

    def _quarantine(self, updates: Updates, rec: RoundRecord) -> None:
        """server.quarantine: an update the cross-site rules flag in this very round (a free rider's, a diverging
        site's) leaves the average (in place); the finding itself is recorded with the round as usual. Only a
        minority is ever left out: where half the round's updates are flagged, the reading itself is in doubt (one
        site sending a noise reading of 0 made every honest site of three read 2× the median), so none is."""
        flagged = [(site, kind) for site, kind in cross_site(rec, before_evaluation=True) if site in updates]
        if 2 * len(flagged) >= len(updates):
            if flagged:
                rec.events.append(Event("quarantine-skipped", f"round {rec.round}: {len(flagged)} of {len(updates)} "
                                        "updates were flagged; none is left out on a reading that names half"))
            return
        for site, kind in flagged:
            row = next((r for r in rec.sites if r.phase == "train" and r.site == site), None)
            if row is not None and not row.left_out:
                self._leave_out(row, updates, rec, f"quarantined as a {kind.replace('_', ' ')} (server.quarantine)")

    def _leave_out(self, row: SiteRoundRow, updates: Updates, rec: RoundRecord, why: str) -> None:
        del updates[row.site]
        row.reason = f"{LEFT_OUT}: {why}"
        rec.events.append(Event("update-excluded", f"{row.site}: {row.reason}", row.site))

    def _cap_weights(self, updates: Updates, rec: RoundRecord) -> None:
        """FedAvg weights bounded (in place): a site's weight is at most server.max-weight-ratio × the median of
        the round's other averaged sites' weights. A site's example count is its own word (its census, noised under
        DP): uncapped, one claiming 10⁹ would own the average. The update stays in; the row and an event say so."""
        ratio = self.cfg.max_weight_ratio
        for site, cap in caps({site: n for site, (_, n) in updates.items()}, ratio).items():
            arrays, n = updates[site]
            updates[site] = (arrays, cap)
            why = (f"its weight {n:.4g} was capped at {cap:.4g}, {ratio:g}× the other sites' median "
                   "(server.max-weight-ratio)")
            row = next(r for r in rec.sites if r.phase == "train" and r.site == site)
            row.reason = f"{row.reason}; {why}" if row.reason else why
            rec.events.append(Event("weight-capped", f"{site}: {why}", site))

    def _check_weight(self, tr: records.TrainReply) -> str:
        """Why the example count a site claims cannot weight its update ("" when it can): it must be positive and
        at most what the site declared when it joined (a site claiming 10⁹ examples would own the average)."""
        declared = self.declared.get(tr.site.name, tr.site.n_train)
        if not 0 < tr.num_examples <= declared:
            return f"claims {tr.num_examples} training examples; expected 1..{declared} (declared when it joined)"
        return ""

    def _collect_evaluate(self, replies: list[SiteReply], rec: RoundRecord, *,
                          trainable_values: int) -> dict[str, float | None]:
        summed: dict[str, np.ndarray] = {}
        sizes = {"val": 0, "train": 0}
        # Sites that trained this round (a rejected update was still trained): their summaries carry train losses.
        trained = {r.site: r for r in rec.sites if r.phase == "train"
                   and (r.status == "ok" or r.reason.startswith("update rejected"))}
        self._each(replies, "evaluate", rec, lambda c: records.unpack_eval_reply(c, self.num_classes),
                   lambda r, ev: self._take_summary(ev, rec, trained.get(ev.site.name), summed, sizes,
                                                    trainable_values))
        if not summed:
            return {}
        # Sums of noised summaries are noised summaries of the union: the global view is post-processing too.
        for name, empty in diagnostics.empty_blocks(summed["confusion"].shape[0]).items():
            summed.setdefault(name, empty)  # no site trained this round: its training blocks are empty
        self.thresholds = diagnostics.thresholds(summed["self_confidence"], summed["confusion"].sum(axis=1)).tolist()
        g = diagnostics.derive(summed, loss_clip=self.loss_clip, n_val=sizes["val"], n_train=sizes["train"],
                               trained=sizes["train"] > 0)
        return {"accuracy": g["accuracy"], "macro_f1": g["macro_f1"], "loss": g["loss"]["val"],
                "train_loss": g["loss"]["train"]}

    def _take_summary(self, ev: records.EvalReply, rec: RoundRecord, train_row: SiteRoundRow | None,
                      summed: dict[str, np.ndarray], sizes: dict[str, int], trainable_values: int) -> None:
        """One site's evaluate reply: its row with the derived summary, its ledger entry, and its share of the
        round's pooled summary and label counts."""
        row = _row("evaluate", ev)
        add: dict[str, np.ndarray] = {}
        if ev.blocks is None:
            if ev.site.status != records.STATUS_OK:  # ok without a summary: dp.diagnostics-share = 0
                rec.events.append(Event("site-refused", ev.site.reason, ev.site.name))
        else:
            did_train = train_row is not None and ev.health_round == rec.round
            # Gradient statistics are measured only at q = 1 (client/train.py): at q < 1 there are none.
            full_batch = train_row is not None and (train_row.sample_rate or 0.0) >= 1.0
            d = diagnostics.derive(ev.blocks, loss_clip=self.loss_clip, n_val=ev.num_examples,
                                   n_train=ev.site.n_train, trainable_values=trainable_values,
                                   dpsgd_noise_multiplier=(train_row.noise_multiplier or 0.0) if full_batch
                                   else 0.0, trained=did_train,
                                   release_noise_multiplier=ev.noise_multiplier,
                                   cross_models=len(ev.cross_models))
            diagnostics.fill_row(row, d, blocks=ev.blocks, noise_multiplier=ev.noise_multiplier,
                                 round_trained=ev.health_round, n_train=ev.site.n_train,
                                 n_val=ev.num_examples, cross=ev.cross, cross_models=ev.cross_models)
            if ev.noise_multiplier > 0:
                rec.ledger.append(LedgerRow(ev.site.name, rec.round, "summary", "gaussian", ev.noise_multiplier,
                                            1.0, 1, ev.sensitivity))
            for name, v in ev.blocks.items():
                if name == diagnostics.EMBEDDING:
                    continue  # per site only (domain.py); its width is the site's word, never summed
                if did_train or name not in diagnostics.TRAINING_BLOCKS:
                    add[name] = summed[name] + v if name in summed else v
            label_std = diagnostics.noise_std(ev.noise_multiplier, len(ev.cross_models))["train_labels"]
        rec.sites.append(row)
        # The server's own state changes last: a reply that failed above left none behind.
        self._register(ev.site)
        if add:
            self.label_counts.add(ev.site.name, ev.blocks["train_labels"], label_std)
            summed.update(add)
            sizes["val"] += ev.num_examples
            sizes["train"] += ev.site.n_train if did_train else 0  # only sites that trained measured train losses


def _row(phase: str, reply: records.TrainReply | records.EvalReply, **extra: object) -> SiteRoundRow:
    """The row of a site's reply: what every reply carries (status, size, ε, σ, timings), plus the phase's own."""
    return SiteRoundRow(site=reply.site.name, phase=phase, status=reply.site.status, reason=reply.site.reason,
                        num_examples=reply.num_examples, epsilon=_eps(reply.epsilon),
                        noise_multiplier=reply.noise_multiplier, seconds=reply.seconds,
                        epsilon_training=_eps(reply.epsilon_training),
                        epsilon_diagnostics=_eps(reply.epsilon_diagnostics),
                        diagnostics_seconds=reply.diagnostics_seconds, started_at=reply.started_at or None,
                        ended_at=reply.ended_at or None, epsilon_lifetime=_eps(reply.epsilon_lifetime),
                        epsilon_cap=reply.epsilon_cap if reply.epsilon_lifetime >= 0 else None, **extra)


def _reason(r: SiteReply) -> str:
    """Why a site gave no usable reply: silence, or the error it (or the SuperLink on its behalf) sent."""
    return "no reply before the timeout" if r.message is None else r.message.error.reason


def _eps(value: float) -> float | None:
    # Sites report -1 when dp.enabled is false: there is no ε to show then, not an ε of 0.
    return None if value < 0 else value
