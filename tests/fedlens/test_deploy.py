"""Key material and the Flower command lines of a deployment: secure unless told otherwise, and clear refusals."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedlens.certs import make_certs, site_names
from fedlens.cli import app
from fedlens.deploy import DeployError, ensure_secret, link_commands, runner_command, site_command


def test_certs_make_a_ca_a_server_certificate_with_sans_and_a_key_pair_per_site(tmp_path):
    paths = make_certs(tmp_path, ["hospital-a", "hospital-b"], hosts=["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.0.0.5"]
    for private, public in paths.site_keys.values():
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert key.curve.name == "secp384r1"
        assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
        assert private.stat().st_mode & 0o777 == 0o600
    assert paths.ca_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="refusing to replace key material"):
        make_certs(tmp_path, ["hospital-a"])


def test_site_names_are_a_count_or_a_list_of_safe_names():
    assert site_names("3") == ["site-0", "site-1", "site-2"]
    assert site_names("a, b") == ["a", "b"]
    with pytest.raises(ValueError, match="--sites"):
        site_names("a,../b")
    with pytest.raises(ValueError, match="repeat"):
        site_names("a,a")


def test_the_link_runs_tls_with_node_auth_a_database_and_its_own_superexec(tmp_path):
    make_certs(tmp_path / "c", ["a"])
    link, execd, gate = link_commands(certs=tmp_path / "c", host="0.0.0.0", port=9000, database=tmp_path / "l.db")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert link[link.index("--isolation") + 1] == "process"
    assert "--disable-runtime-dependency-installation" in link
    assert link[link.index("--database") + 1] == str(tmp_path / "l.db")
    # The SuperLink (Fleet, Control, Runtime on one port) listens on loopback whatever --host says; the public
    # address is the Fleet gate's, forwarding to it with its certificate checked against the CA.
    assert link[link.index("--host") + 1: link.index("--port") + 2] == ["127.0.0.1", "--port", "9093"]
    assert execd[execd.index("--runtime-api-address") + 1] == "127.0.0.1:9093"
    assert execd[execd.index("--root-certificates") + 1] == str((tmp_path / "c" / "ca.crt").resolve())
    assert gate[1:] == ["-m", "fedlens.gate", "--listen", "0.0.0.0:9000", "--upstream", "https://127.0.0.1:9093",
                        "--ssl-certfile", str((tmp_path / "c" / "server.crt").resolve()), "--ssl-keyfile",
                        str((tmp_path / "c" / "server.key").resolve()), "--ca", str((tmp_path / "c" / "ca.crt").resolve()),
                        # fedlens certs wrote the site registry: the gate reads only bodies its keys signed
                        "--registry", str((tmp_path / "c" / "registry.toml").resolve())]
    secret = str((tmp_path / "c" / "superexec.secret").resolve())
    assert link[link.index("--superexec-auth-secret-file") + 1] == execd[execd.index(
        "--superexec-auth-secret-file") + 1] == secret
    with pytest.raises(DeployError, match="--port 9093 and --control-port 9093 must differ"):
        link_commands(certs=tmp_path / "c", host="0.0.0.0", port=9093, database=tmp_path / "l.db")


def test_the_superexec_secret_is_always_made_and_required(tmp_path):
    # Without certs/superexec.secret the Runtime API ran unauthenticated; now the file is made when missing.
    secret = ensure_secret(tmp_path / "x" / "superexec.secret")
    assert len(secret.read_text()) == 64 and secret.stat().st_mode & 0o777 == 0o600
    assert ensure_secret(secret).read_text() == secret.read_text()  # kept once made
    link, execd, _ = link_commands(certs=None, host="127.0.0.1", port=9000, database=tmp_path / "l.db",
                                   insecure=True)
    assert link[link.index("--superexec-auth-secret-file") + 1] == str((tmp_path / "superexec.secret").resolve())
    assert "--superexec-auth-secret-file" in execd


def test_no_tls_is_refused_unless_asked_for_and_never_off_loopback(tmp_path):
    with pytest.raises(DeployError, match="no --certs folder: the SuperLink needs TLS"):
        link_commands(certs=None, host="127.0.0.1", port=9000, database=tmp_path / "l.db")
    with pytest.raises(DeployError, match="CA certificate not found at"):
        link_commands(certs=tmp_path, host="127.0.0.1", port=9000, database=tmp_path / "l.db")
    with pytest.raises(DeployError, match="--insecure with --host 0.0.0.0"):
        link_commands(certs=None, host="0.0.0.0", port=9000, database=tmp_path / "l.db", insecure=True)
    link, _, gate = link_commands(certs=None, host="127.0.0.1", port=9000, database=tmp_path / "l.db", insecure=True)
    assert "--insecure" in link and "--enable-supernode-auth" not in link
    assert gate[gate.index("--upstream") + 1] == "http://127.0.0.1:9093"


def test_a_site_dials_with_the_ca_and_its_key_and_names_itself(tmp_path):
    paths = make_certs(tmp_path / "c", ["hospital-a"])
    data = tmp_path / "a.csv"
    data.write_text("review,rating\ngood,positive\n")
    cmd = site_command(name="hospital-a", superlink="link:9000", data=data, state_dir=tmp_path / "st", port=9100,
                       ca=paths.ca_cert, key=paths.site_keys["hospital-a"][0])
    assert cmd[cmd.index("--node-config") + 1] == (f'site-name="hospital-a" state-dir="{tmp_path / "st"}" '
                                                   f'data-path="{data}"')
    assert "--auth-supernode-private-key" in cmd and "--insecure" not in cmd
    # The SuperNode runs no ClientApp itself: the site's runner does, authenticated by a secret in its state folder.
    secret = str((tmp_path / "st" / "runner.secret").resolve())
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == secret
    assert runner_command(port=9100, state_dir=tmp_path / "st", digests=["ab" * 32])[1:] == [
        "-m", "fedlens.site_runner", "--runtime-api-address", "127.0.0.1:9100", "--secret-file", secret,
        "--app-digest", "ab" * 32]
    assert runner_command(port=9100, state_dir=tmp_path / "st", threads=2)[-2:] == ["--threads", "2"]
    assert "--heartbeat-interval" not in cmd  # Flower's own 30 s unless the site asks
    fast = site_command(name="hospital-a", superlink="l:1", data=None, state_dir=tmp_path / "st", port=1,
                        insecure=True, heartbeat=10)
    assert fast[fast.index("--heartbeat-interval") + 1] == "10"
    with pytest.raises(DeployError, match="--heartbeat 5: expected 10 to 1800 seconds"):
        site_command(name="hospital-a", superlink="l:1", data=None, state_dir=tmp_path, port=1, insecure=True,
                     heartbeat=5)
    with pytest.raises(DeployError, match="--app-digest 'xyz': expected the SHA-256 of an app bundle"):
        runner_command(port=1, state_dir=tmp_path, digests=["xyz"])
    with pytest.raises(DeployError, match="--threads -1: expected 0"):
        runner_command(port=1, state_dir=tmp_path, threads=-1)
    with pytest.raises(DeployError, match="site hospital-a: data file .*nope.csv does not exist"):
        site_command(name="hospital-a", superlink="l:1", data=tmp_path / "nope.csv", state_dir=tmp_path, port=1,
                     ca=paths.ca_cert, key=paths.site_keys["hospital-a"][0])
    with pytest.raises(DeployError, match="site hospital-a: TLS needs the deployment's CA certificate"):
        site_command(name="hospital-a", superlink="l:1", data=None, state_dir=tmp_path, port=1)
    with pytest.raises(DeployError, match="site name 'a b'"):
        site_command(name="a b", superlink="l:1", data=None, state_dir=tmp_path, port=1, insecure=True)


def test_the_cli_prints_the_commands_and_warns_when_insecure(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["certs", "--out", str(tmp_path / "c"), "--sites", "a,b"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["link", "--certs", str(tmp_path / "c"), "--dry-run"])
    assert res.exit_code == 0 and "flower-superlink" in res.output and "--enable-supernode-auth" in res.output
    res = runner.invoke(app, ["link", "--dry-run"])
    assert res.exit_code == 2 and "the SuperLink needs TLS" in res.output
    res = runner.invoke(app, ["site", "a", "--insecure", "--dry-run", "--state-dir", str(tmp_path / "s")])
    assert res.exit_code == 0 and "WARNING: --insecure" in res.output
    res = runner.invoke(app, ["site", "b", "--certs", str(tmp_path / "c"), "--dry-run", "--state-dir",
                              str(tmp_path / "s")])
    assert res.exit_code == 0 and str((tmp_path / "c" / "sites" / "b").resolve()) in res.output


def test_a_sites_own_policy_travels_in_its_node_config_and_flower_parses_it(tmp_path):
    from flwr.common.config import parse_config_args

    from client.policy import load_policy

    runner = CliRunner()
    res = runner.invoke(app, ["site", "a", "--insecure", "--dry-run", "--state-dir", str(tmp_path / "s"),
                              "--epsilon-cap", "4", "--min-noise-multiplier", "0.8", "--allow-non-dp"])
    assert res.exit_code == 0, res.output
    cmd = next(line for line in res.output.strip().splitlines() if "fedlens.supernode" in line)
    node_config = cmd[cmd.index("--node-config") + len("--node-config "):cmd.index(" --isolation")]
    parsed = parse_config_args([node_config.strip("'")])
    assert parsed["epsilon-cap"] == 4.0 and parsed["allow-non-dp"] is True
    # The whole policy travels, resolved from this machine's install: a run's own pyproject cannot fill a gap.
    assert parsed["delta"] == 0.0 and parsed["min-noise-multiplier"] == 0.8 and parsed["allow-injected-faults"] is False
    policy = load_policy(tmp_path / "s", parsed)
    assert (policy.epsilon_cap, policy.min_noise_multiplier, policy.allow_non_dp) == (4.0, 0.8, True)


def test_the_supernode_polls_with_a_backoff(monkeypatch):
    # Flower's SuperNode sleeps 3 s after every empty pull and 0.5 s between looks for its reply: most of a loopback
    # round. In fedlens.supernode the first wait after a message is 0.05 s, doubling up to Flower's 3 s.
    from fedlens import supernode

    slept, now = [], [1000.0]
    monkeypatch.setattr(supernode._time, "sleep", slept.append)
    monkeypatch.setattr(supernode._time, "monotonic", lambda: now[0])
    clock = supernode.BackoffClock()
    for s in (3, 3, 3, 3, 3, 3, 3, 3):  # idle since start: up to Flower's 3 s
        clock.sleep(s)
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0]
    slept.clear()
    for s in (0.5, 0.5, 0.5, 0.5, 3, 3, 3, 3, 0.5, 1.25):  # a message handled: 0.05 s, doubling to 0.2 s in a run
        clock.sleep(s)
    # Its reply looked for after 0.02 s, doubling to 0.1 s, and from 0.02 s again for the next message.
    assert slept == [0.02, 0.04, 0.08, 0.1, 0.05, 0.1, 0.2, 0.2, 0.02, 1.25]
    now[0] += 61  # a minute without a message: idle again
    slept.clear()
    for _ in range(5):
        clock.sleep(3)
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8]  # past 0.2 s: idle
    assert clock.time() > 0  # everything else is the time module's
