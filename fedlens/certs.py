"""Deployment, before step 1: key material: a CA, the SuperLink's TLS certificate, and one SuperNode auth key pair
per site.

`fedlens certs --out certs --sites hospital-a,hospital-b,hospital-c --host link.example.org` writes

    certs/ca.crt  ca.key                  the CA: ca.crt goes to every site (--root-certificates), ca.key stays offline
    certs/server.crt  server.key          the SuperLink's certificate, SANs = localhost, 127.0.0.1 and every --host
    certs/superexec.secret                the shared secret of the SuperLink and its SuperExec (stays at the link)
    certs/sites/<site>  <site>.pub        the site's EC P-384 key pair in OpenSSH format: the private key stays at the
                                          site (--auth-supernode-private-key), the public key is registered at the link
    certs/registry.toml                   the coordinator's site registry, site name -> public key, for every key in
                                          certs/sites/ (server.site-registry): a node answering under a name whose key
                                          it does not hold is refused (server/identity.py)

This is what Flower's own prototyping script does, in Python (the `cryptography` package Flower already installs),
so that it runs the same everywhere. Real operators use their own PKI: any CA-signed server certificate whose SANs
name the address the sites dial works, and each site may make its own key pair (`ssh-keygen -t ecdsa -b 384`) and
send only the public half.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.records import SITE_NAME
from server.identity import registry_text

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site -> (private key, public key)


def site_names(sites: str) -> list[str]:
    """`3` -> site-0..site-2; `a,b,c` -> those names (each a valid node-config value and file name)."""
    sites = sites.strip()
    names = [f"site-{i}" for i in range(int(sites))] if sites.isdigit() else [s.strip() for s in sites.split(",")]
    bad = [s for s in names if not SITE_NAME.match(s)]
    if not names or bad:
        raise ValueError(f"--sites: expected a count or comma-separated names of letters, digits, '.', '_' or '-', "
                         f"got {bad or sites!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"--sites: names repeat in {sites!r}")
    return names


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private file is created readable by its owner only from its first byte (no window under the umask); one
    # that existed keeps its inode, so its mode is set again.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        path.chmod(0o600)


def _pem_key(key) -> bytes:  # noqa: ANN001
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out: Path, sites: list[str], *, hosts: list[str] | None = None, days: int = 365,
               overwrite: bool = False) -> CertPaths:
    """Write the CA, the server certificate (SANs: loopback plus `hosts`) and one key pair per site under `out`."""
    out = Path(out)
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key",
                      {s: (out / "sites" / s, out / "sites" / f"{s}.pub") for s in sites})
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; refusing to replace key material (pass --overwrite, and "
                              "re-distribute ca.crt to every site)")
    now = dt.datetime.now(dt.UTC)
    valid_from = now - dt.timedelta(minutes=5)  # tolerate small clock skew between the sites and the link

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlens deployment CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(valid_from)
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    names = list(dict.fromkeys([*DEFAULT_HOSTS, *(hosts or [])]))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(valid_from)
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))

    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "superexec.secret", secrets.token_hex(32).encode(), private=True)
    for site, (private_path, public_path) in paths.site_keys.items():
        if private_path.exists() and not overwrite:
            continue  # a site's key is its identity at the link: never silently replaced
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), private=True)
        _write(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + f" {site}\n".encode(),
               private=False)
    # Every site key here, old and new: sites added later join the same registry.
    keys = {p.name[:-len(".pub")]: " ".join(p.read_text().split()[:2]) for p in sorted((out / "sites").glob("*.pub"))}
    _write(out / "registry.toml", registry_text(keys).encode(), private=False)
    return paths
