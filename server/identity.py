"""Step 4, before anything a reply says is used: which site a node is. A site's name is bound to the key it
authenticates with, so no node can answer under another site's name and have its update, ε and findings filed there.

Three sources, strongest first:
- the coordinator's site registry (`server.site-registry`, written by `fedlens certs` as certs/registry.toml): site
  name -> the public key that site's SuperNode authenticates with (Flower's node authentication proves the node
  holds the private half). The registry lives with the operator, outside Flower's own state, so even a key
  registered at the link under a stolen name does not pass;
- without a registry, the name the node was registered under at the link (`flwr supernode register --name`), which
  the SuperLink reports with each node;
- with neither (simulation, an insecure loopback run), the first node to use a name holds it for the run.

A node that answers under a name it does not hold, or under another name than it used before, is refused for that
message; the server records it as an event and files the reply under the node's own identity, never the victim's.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

REGISTRY_SECTION = "sites"


@dataclass(frozen=True)
class Node:
    """What the link says of a node: the name it was registered under and its public key (PEM), both may be
    empty (simulation)."""

    node_id: int
    name: str = ""
    public_key: bytes = b""


def spki_der(key: object) -> bytes:
    """A public key as DER SubjectPublicKeyInfo: how the registry, the link's node records and the Fleet gate compare
    keys."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def load_registry(path: str | Path) -> dict[str, bytes]:
    """site name -> its public key (DER SubjectPublicKeyInfo) from a registry TOML: `[sites]` with one
    `name = "<OpenSSH public key line>"` per site.

    Raises:
        FileNotFoundError, ValueError: naming the file and the site whose entry is not a public key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"server.site-registry: {path} does not exist (write it with `fedlens certs`)")
    try:
        table = tomllib.loads(path.read_text()).get(REGISTRY_SECTION)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"server.site-registry: {path} is not TOML: {e}") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"server.site-registry: {path} has no [{REGISTRY_SECTION}] table of site = public key")
    out = {}
    for site, line in table.items():
        try:
            out[site] = spki_der(serialization.load_ssh_public_key(str(line).encode()))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"server.site-registry: {path}: [{REGISTRY_SECTION}] {site} is not an OpenSSH public "
                             "key line (as in certs/sites/<site>.pub)") from None
    return out


def registry_text(keys: dict[str, str]) -> str:
    """The registry TOML for site -> OpenSSH public key line (what `fedlens certs` writes)."""
    lines = ["# fedlens site registry: the coordinator's record of which key each site authenticates with",
             "# (server.site-registry). Keep it with the operator; sites never need it.", f"[{REGISTRY_SECTION}]"]
    lines += [f'"{site}" = "{line.strip()}"' for site, line in sorted(keys.items())]
    return "\n".join(lines) + "\n"


class Identities:
    """The binding of node ids to site names for one run (kept across a resume by replaying the same checks)."""

    def __init__(self, registry: dict[str, bytes] | None = None) -> None:
        self.registry = registry
        self.nodes: dict[int, Node] = {}  # what the link last said of each node
        self.name_of: dict[int, str] = {}  # node id -> the site name it holds
        self.node_of: dict[str, int] = {}  # site name -> the node id holding it

    def learn(self, nodes: Iterable[Node]) -> None:
        for n in nodes:
            self.nodes[n.node_id] = n

    def forget(self, node_ids: Iterable[int]) -> None:
        """Nodes the link no longer lists: their names are free again (an insecure SuperNode that restarts makes
        a new key and comes back under a new node id)."""
        for node_id in node_ids:
            name = self.name_of.pop(node_id, None)
            if name is not None and self.node_of.get(name) == node_id:
                del self.node_of[name]
            self.nodes.pop(node_id, None)

    def check(self, node_id: int, name: str) -> str:
        """Why `node_id` may not answer as `name` ("" when it may; the binding is then made). The key (or the link's
        name) is checked first, so an impostor is told the same every time; first use binds last."""
        node = self.nodes.get(node_id, Node(node_id))
        if self.registry is not None:
            key = self.registry.get(name)
            if key is None:
                return f"node {node_id} answered as {name}, which is not in the site registry"
            if not node.public_key or _der(node.public_key) != key:
                return f"node {node_id} answered as {name} without {name}'s registered key"
        elif node.name and node.name != name:
            return f"node {node_id} answered as {name} but is registered at the link as {node.name}"
        elif not node.name and any(n.name for n in self.nodes.values()):
            # The link names its nodes: one registered without a name may not pick a name of its own.
            return f"node {node_id} answered as {name} but was registered at the link without a name"
        held = self.node_of.get(name)
        if held is not None and held != node_id:
            return f"node {node_id} answered as {name}, a name node {held} holds in this run"
        bound = self.name_of.get(node_id)
        if bound is not None and bound != name:
            return f"node {node_id} answered as {name} after answering as {bound}"
        self.name_of[node_id], self.node_of[name] = name, node_id
        return ""


def _der(pem: bytes) -> bytes:
    try:
        return spki_der(serialization.load_pem_public_key(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return b""
