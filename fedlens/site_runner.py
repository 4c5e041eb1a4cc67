"""Deployment, steps 1-3 at a site: one long-lived process that runs the site's ClientApp for every message, and only
the app whose digest the site pinned.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` process for every message: 1.2 s for
Flower, 3.8 s more of imports, then the tokenizer, data and model are rebuilt inside the handler (a loopback round
took 35 s where the simulation took 9 s; docs/PERFORMANCE.md). `fedlens site` starts the SuperNode with `--isolation
process` instead, so the SuperNode runs no app itself, and this process beside it takes the SuperNode's tasks from its
local Runtime API (authenticated by a secret only the two share), one at a time, and runs each here: the ClientApp's
caches (tokenizer, tokenised data, model, head mode's features; client/site.py) stay warm across messages.

The app comes from the coordinator (Flower's app bundle, a FAB: a zip of the project's files). Before loading one,
this process checks the bundle's code digest against the digests the site pinned: by default that of the site's own
fedlens install (the same code, so the coordinator cannot ship different code), or those given with `fedlens site
--app-digest`. Any other bundle gets an error reply naming its digest, and none of its code is imported. The code
digest is the SHA-256 of the bundle's manifest of `.py` and `.toml` files (path and SHA-256 of each), and those
files are all of the bundle this process ever writes or loads: it unpacks them itself, into a folder of its own
named by the digest (never Flower's shared app folder, where a bundle's other members, a `.pyc` or an `.so` beside a
pinned `.py`, would be imported instead of it), refusing names that are not plain relative paths or that collide
when case is ignored. A README or a benchmark JSON that differs between the coordinator's checkout and the site's
does not refuse a run, and cannot run either. One process runs one app: a module imported for one digest is never
reused for another.

    python -m fedlens.site_runner --runtime-api-address 127.0.0.1:9094 --secret-file state/runner.secret \
        --app-digest <sha256>
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import httpx
from flwr.app import Error, Message
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

# The fedlens logger by name, not common.log: nothing of the project but this module is imported before the verified
# app is, so the app's modules (client, common) come from the bundle the site checked.
log = logging.getLogger("fedlens")
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the call the shared secret signs (as Flower's SuperExec does)
# Between polls for a task: soon after one, doubling to 0.2 s for a minute after it (a run under way), then to
# Flower's 1 s (idle).
POLL_FIRST_S, POLL_BUSY_S, POLL_MAX_S, BUSY_WINDOW_S = 0.05, 0.2, 1.0, 60.0
# The SuperNode offers a task as soon as it has the message, before it has pulled all of the message's objects from
# the link; Flower's own pull then waits a first 1 s for the missing ones. Here it looks again after 0.02 s.
OBJECT_BACKOFF_S, OBJECT_BACKOFF_CAP_S = 0.02, 1.0
RETRYABLE = (httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT)


class UntrustedApp(RuntimeError):
    """An app bundle whose digest the site did not pin."""


CODE_SUFFIXES = (".py", ".toml")  # what a bundle's code digest covers, and all this process unpacks
MAX_BUNDLE_BYTES = 256 * 2**20  # a bundle that unpacks to more than this is refused unread
SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # one component of a member's path


def code_files(bundle: bytes) -> dict[str, bytes]:
    """The `.py` and `.toml` members of an app bundle, by path.

    Raises:
        UntrustedApp: not a zip, one that unpacks to more than MAX_BUNDLE_BYTES, or a code member whose path is not
            plain (each part letters, digits, '_', '.', '-', not starting with '.' or '-'; no `__pycache__`) or that
            another one's matches when case is ignored.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > MAX_BUNDLE_BYTES:
                raise UntrustedApp(f"the app bundle unpacks to more than {MAX_BUNDLE_BYTES} bytes: not run")
            out: dict[str, bytes] = {}
            folded: set[str] = set()
            for m in members:
                if not m.filename.endswith(CODE_SUFFIXES):
                    continue
                parts = m.filename.split("/")
                if not all(SAFE_PART.fullmatch(p) for p in parts) or "__pycache__" in parts:
                    raise UntrustedApp(f"the app bundle holds a code file named {m.filename[:80]!r}: not run")
                if m.filename.casefold() in folded:
                    raise UntrustedApp(f"the app bundle holds {m.filename[:80]!r} twice (ignoring case): not run")
                folded.add(m.filename.casefold())
                out[m.filename] = z.read(m)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UntrustedApp(f"the app bundle is not a readable zip ({type(e).__name__}): not run") from None
    return out


def code_digest(bundle: bytes) -> str:
    """SHA-256 of an app bundle's manifest of code files: one line `path NUL sha256(content)` per `.py` / `.toml`
    member (code_files), sorted by path.

    Raises:
        UntrustedApp: as code_files.
    """
    lines = sorted(f"{name}\0{hashlib.sha256(data).hexdigest()}\n" for name, data in code_files(bundle).items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def unpack(bundle: bytes, digest: str, apps: Path) -> Path:
    """The bundle's code files, written to `apps`/<digest> (once: an existing folder was written by this function
    for the same digest), and nothing else of it."""
    dest = apps / digest
    if not dest.is_dir():
        tmp = apps / f".{digest}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in code_files(bundle).items():
            path = tmp.joinpath(*name.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        os.replace(tmp, dest)  # whole, or not at all
    return dest


def app_digest(project: Path) -> str:
    """The code digest of the app bundle `flwr run <project>` would send (Flower builds it the same way here)."""
    from flwr.cli.build import build_fab_from_disk

    return code_digest(build_fab_from_disk(project))


def own_digest() -> str:
    """The digest of this fedlens install's own project, the app a site trusts by default.

    Raises:
        FileNotFoundError: fedlens is not installed from a project folder (pass the digest with --app-digest).
    """
    project = Path(__file__).resolve().parents[1]
    if not (project / "pyproject.toml").is_file():
        raise FileNotFoundError(f"fedlens is not installed from a project folder ({project} has no pyproject.toml): "
                                "pass the digest of the app this site runs with --app-digest")
    return app_digest(project)


class Runner:
    """Takes the SuperNode's tasks and runs them in this process, keeping each trusted app loaded."""

    def __init__(self, address: str, *, digests: set[str], secret: bytes | None, apps: Path) -> None:
        self.address = address
        self.digests = digests
        self.secret = secret
        self.apps_dir = apps  # this runner's own unpacked apps (unpack), one folder per digest
        self.apps: dict[str, ClientApp] = {}  # app digest -> its loaded ClientApp (one, by the rule above)
        # Bundle hash -> its code digest: every message of a run carries the same bundle, unzipped and hashed once.
        self.digest_of: dict[str, str] = {}

    def _client(self, *interceptors: object, retry: RetryInvoker | None = None) -> RuntimeHttpClient:
        # The SuperNode's Runtime API listens on loopback, without TLS (Flower's own SuperExec dials it the same way).
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=list(interceptors),
                                                     retry_invoker=retry or make_simple_http_retry_invoker())

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll for tasks and run each; forever, or until `max_tasks` have run."""
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={ACQUIRE}))
        # Flower's retry here: a wrong secret (401) ends this process, and the site with it, rather than polling on.
        client = self._client(*interceptors)
        done, wait, busy_at = 0, POLL_FIRST_S, -BUSY_WINDOW_S
        try:
            while max_tasks is None or done < max_tasks:
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                                agentapp_fab_hashes=[]))
                    if res.HasField("task") and res.token:
                        self.run_task(res.token)
                        done, wait, busy_at = done + 1, POLL_FIRST_S, time.monotonic()
                        continue
                except (Exception, RunNotRunningException) as e:  # noqa: BLE001 -- the SuperNode's trouble, not ours
                    log.warning("site runner: asking the SuperNode for a task failed (%s: %s); trying again",
                                type(e).__name__, e)
                    wait = POLL_MAX_S
                time.sleep(wait)
                busy = time.monotonic() - busy_at < BUSY_WINDOW_S
                wait = min(2 * wait, POLL_BUSY_S if busy else POLL_MAX_S)
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """One message: pull it with its context and app bundle, check the bundle, run the ClientApp, push the reply
        and the task's outcome (as `flwr-clientapp` does, in this process)."""
        # This task's calls give up on an answer that will not change (a stopped run: 403, an expired task: 401)
        # instead of Flower's reaction for its one-task processes (raising SIGINT in the process): this process
        # goes on to the next task.
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token), retry=_task_retry())
        # The heartbeat has a client of its own that does not retry: stopping it never waits on a retry.
        beat_client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                   RuntimeTokenHttpInterceptor(token), retry=_no_retry())
        heartbeat = HeartbeatSender(_heartbeat(beat_client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = _pull_task_input(client)
            app = self._app(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except (Exception, RunNotRunningException, SystemExit) as e:  # noqa: BLE001 -- the reply says why
            log.exception("site runner: the task failed")
            details = str(e) if isinstance(e, UntrustedApp) else f"{type(e)}:<'{e}'>"
            code = (ErrorCode.INVALID_FAB if isinstance(e, UntrustedApp) else ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                    if isinstance(e, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            # As flwr-clientapp: the reply, then the task's outcome, each on its own (one failing does not skip the
            # other, nor end this process).
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except (Exception, RunNotRunningException):  # noqa: BLE001
                    log.exception("site runner: the reply could not be pushed")
            try:
                push_task_output(client, context, status, details)
            except (Exception, RunNotRunningException):  # noqa: BLE001
                log.exception("site runner: the task's outcome could not be pushed")
            if heartbeat.is_running:
                heartbeat.stop()
            beat_client.close()
            client.close()

    def _app(self, run: object, fab: object) -> ClientApp:
        """The ClientApp of a trusted bundle, unpacked and imported the first time it is seen."""
        if hashlib.sha256(fab.content).hexdigest() != fab.hash_str:  # type: ignore[attr-defined]
            raise UntrustedApp("the app bundle's content does not match its hash: not run")
        # Keyed by the hash just checked against the content, so a cached digest is the digest of these bytes.
        digest = self.digest_of.get(fab.hash_str) or code_digest(fab.content)  # type: ignore[attr-defined]
        self.digest_of[fab.hash_str] = digest  # type: ignore[attr-defined]
        if digest not in self.digests:
            # The whole digest: an operator who reviewed this app pins it with `fedlens site --app-digest`.
            raise UntrustedApp(f"the app bundle's code digest {digest} is not one this site pinned "
                               f"({', '.join(sorted(self.digests))}): not run")
        if digest not in self.apps:
            if self.apps:  # its modules would be the first app's (sys.modules): one app a process
                raise UntrustedApp(f"this site runner already serves app {next(iter(self.apps))}; restart it "
                                   "(fedlens site) to run another")
            folder = unpack(fab.content, digest, self.apps_dir)  # type: ignore[attr-defined]
            # Loaded from that folder, whatever the run record says its id or version is (Flower's shared app
            # folder is chosen by those and 8 hex digits of the bundle's hash).
            load = get_load_client_app_fn(default_app_ref="", app_path=str(folder), multi_app=True)
            self.apps[digest] = load(run.fab_id, run.fab_version, fab.hash_str)  # type: ignore[attr-defined]
            log.info("site runner: app %s… loaded; it stays loaded for every message", digest[:16])
        return self.apps[digest]


def _task_retry() -> RetryInvoker:
    """Retries for one task's calls: transport errors and 502/503/504 only, for at most a minute; nothing else."""

    def giveup(e: Exception) -> bool:
        return isinstance(e, httpx.HTTPStatusError) and e.response.status_code not in RETRYABLE

    return RetryInvoker(lambda: exponential(base_delay=0.2, max_delay=5), (httpx.TransportError,
                                                                            httpx.HTTPStatusError),
                        max_tries=None, max_time=60, should_giveup=giveup)


def _no_retry() -> RetryInvoker:
    return RetryInvoker(lambda: exponential(), (httpx.TransportError, httpx.HTTPStatusError), max_tries=1,
                        max_time=None)


def _heartbeat(client: RuntimeHttpClient):  # noqa: ANN202
    """The task's heartbeat: a missed or refused beat is logged; unlike Flower's, it raises no signal here (the
    task runs on; its own calls fail if the SuperNode has dropped it, and the task ends with that reason)."""
    req = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            ok = client.SendTaskHeartbeat(req).success
        except (Exception, RunNotRunningException):  # noqa: BLE001
            return False
        if not ok:
            log.warning("site runner: the SuperNode no longer knows this task")
        return True

    return beat


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, object, object, object]:
    """The task's message, context, run and app bundle (flwr-clientapp's pull_task_input, with a short first wait
    for objects the SuperNode is still fetching: OBJECT_BACKOFF_S)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode had no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=OBJECT_BACKOFF_S, backoff_cap=OBJECT_BACKOFF_CAP_S,
        max_tries_per_object=None)  # bounded by Flower's max_time, as before the shorter waits
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its own id
    return message, context, run, fab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedlens.site_runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--secret-file", type=Path, help="the secret shared with the SuperNode (signs task requests)")
    p.add_argument("--apps-dir", type=Path, help="where this runner unpacks the apps it verified (default: beside "
                   "the secret file, else ~/.fedlens/apps)")
    p.add_argument("--app-digest", action="append", default=[],
                   help="SHA-256 of an app bundle this site runs (repeatable; default: its own install's)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for training and evaluation (default 0: torch's own, every core)")
    args = p.parse_args(argv)
    if args.threads > 0:
        # Before the app is loaded: a machine that hosts several sites (or other work) gives each its share, as
        # the simulation gives each site simulation.client-cpus; more threads than cores only fight for them.
        import torch

        torch.set_num_threads(args.threads)
    digests = set(args.app_digest) or {own_digest()}
    secret = args.secret_file.read_bytes() if args.secret_file else None  # as the SuperNode reads it: raw bytes
    print(f"fedlens site runner: serving {args.runtime_api_address}, apps {', '.join(sorted(digests))}", flush=True)
    apps = args.apps_dir or (args.secret_file.parent / "apps" if args.secret_file else
                             Path.home() / ".fedlens" / "apps")
    Runner(args.runtime_api_address, digests=digests, secret=secret, apps=apps).serve()


if __name__ == "__main__":
    main()
