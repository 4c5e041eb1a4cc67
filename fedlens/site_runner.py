"""Deployment, steps 1-3 at a site: one long-lived process that runs the site's ClientApp for every message, and only
the app whose digest the site pinned.

Flower's default (`--isolation subprocess`) starts a fresh `flwr-clientapp` process for every message: 1.2 s for
Flower, 3.8 s more of imports, then the tokenizer, data and model are rebuilt inside the handler (a loopback round
took 35 s where the simulation took 9 s; docs/PERFORMANCE.md). `fedlens site` starts the SuperNode with `--isolation
process` instead, so the SuperNode runs no app itself, and this process beside it takes the SuperNode's tasks from its
local Runtime API (authenticated by a secret only the two share), one at a time, and runs each here: the ClientApp's
caches (tokenizer, tokenised data, model, head mode's features; client/site.py) stay warm across messages.

The app comes from the coordinator (Flower's app bundle, a FAB). Before loading one, this process checks the bundle's
SHA-256 against the digests the site pinned: by default the digest of the site's own fedlens install (the same code,
so the coordinator cannot ship different code), or those given with `fedlens site --app-digest`. Any other bundle
gets an error reply naming both digests, and none of its code is imported. One process runs one app: a module
imported for one digest is never reused for another.

    python -m fedlens.site_runner --runtime-api-address 127.0.0.1:9094 --secret-file state/runner.secret \
        --app-digest <sha256>
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path

from flwr.app import Error, Message
from flwr.clientapp.client_app import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# The fedlens logger by name, not common.log: nothing of the project is imported before the verified app is, so its
# modules come from the bundle the site checked.
log = logging.getLogger("fedlens")
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the call the shared secret signs (as Flower's SuperExec does)
POLL_S = 0.05  # seconds between polls for a task while idle (Flower's SuperExec: 1 s)


class UntrustedApp(RuntimeError):
    """An app bundle whose digest the site did not pin."""


def app_digest(project: Path) -> str:
    """SHA-256 of the app bundle `flwr run <project>` would send (Flower builds it byte for byte the same way)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(project)).hexdigest()


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

    def __init__(self, address: str, *, digests: set[str], secret: bytes | None) -> None:
        self.address = address
        self.digests = digests
        self.secret = secret
        self.apps: dict[str, ClientApp] = {}  # app digest -> its loaded ClientApp (one, by the rule above)

    def _client(self, *interceptors: object) -> RuntimeHttpClient:
        # The SuperNode's Runtime API listens on loopback, without TLS (Flower's own SuperExec dials it the same way).
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=list(interceptors),
                                                     retry_invoker=make_simple_http_retry_invoker())

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll for tasks and run each; forever, or until `max_tasks` have run."""
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={ACQUIRE}))
        client = self._client(*interceptors)
        done = 0
        try:
            while max_tasks is None or done < max_tasks:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                            agentapp_fab_hashes=[]))
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    done += 1
                else:
                    time.sleep(POLL_S)
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """One message: pull it with its context and app bundle, check the bundle, run the ClientApp, push the reply
        and the task's outcome (as `flwr-clientapp` does, in this process)."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            app = self._app(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as e:  # noqa: BLE001 -- the reply says what went wrong; the process serves the next task
            log.exception("site runner: the task failed")
            untrusted = isinstance(e, UntrustedApp)
            details = str(e) if untrusted else f"{type(e)}:<'{e}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.INVALID_FAB if untrusted
                                      else ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()

    def _app(self, run: object, fab: object) -> ClientApp:
        """The ClientApp of a trusted bundle, installed and imported the first time it is seen."""
        digest = fab.hash_str  # type: ignore[attr-defined]
        if digest not in self.digests:
            raise UntrustedApp(f"the app bundle {digest[:16]}… is not one this site pinned "
                               f"({', '.join(d[:16] + '…' for d in sorted(self.digests))}): not run")
        if hashlib.sha256(fab.content).hexdigest() != digest:  # type: ignore[attr-defined]
            raise UntrustedApp("the app bundle's content does not match its digest: not run")
        if digest not in self.apps:
            if self.apps:  # its modules would be the first app's (sys.modules): one app a process
                raise UntrustedApp(f"this site runner already serves app {next(iter(self.apps))[:16]}…; restart it "
                                   "to run another")
            from flwr.cli.install import install_from_fab

            install_from_fab(fab.content, skip_prompt=True)  # type: ignore[attr-defined]
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[digest] = load(run.fab_id, run.fab_version, digest)  # type: ignore[attr-defined]
            log.info("site runner: app %s… loaded; it stays loaded for every message", digest[:16])
        return self.apps[digest]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedlens.site_runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--secret-file", type=Path, help="the secret shared with the SuperNode (signs task requests)")
    p.add_argument("--app-digest", action="append", default=[],
                   help="SHA-256 of an app bundle this site runs (repeatable; default: its own install's)")
    args = p.parse_args(argv)
    digests = set(args.app_digest) or {own_digest()}
    secret = args.secret_file.read_bytes().strip() if args.secret_file else None
    print(f"fedlens site runner: serving {args.runtime_api_address}, apps {', '.join(sorted(digests))}", flush=True)
    Runner(args.runtime_api_address, digests=digests, secret=secret).serve()


if __name__ == "__main__":
    main()
