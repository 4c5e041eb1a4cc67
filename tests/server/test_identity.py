"""Which site a node is: names bound to keys (registry), to the link's registered names, or to first use."""

import pytest
from cryptography.hazmat.primitives import serialization

from fedlens.certs import make_certs
from server.identity import Identities, Node, load_registry


def pem_of(pub_path):
    """The key as the SuperLink reports it for a node (PEM SubjectPublicKeyInfo, flwr's public_key_to_bytes)."""
    key = serialization.load_ssh_public_key(pub_path.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_without_a_registry_a_name_belongs_to_the_first_node_that_uses_it():
    ids = Identities()
    assert ids.check(1, "a") == "" and ids.check(2, "b") == "" and ids.check(1, "a") == ""
    assert ids.check(2, "a") == "node 2 answered as a, a name node 1 holds in this run"
    assert ids.check(1, "c") == "node 1 answered as c after answering as a"


def test_the_links_registered_name_binds_a_node():
    ids = Identities()
    ids.learn([Node(7, "hospital-a"), Node(8, "")])
    assert ids.check(7, "hospital-b") == "node 7 answered as hospital-b but is registered at the link as hospital-a"
    assert ids.check(7, "hospital-a") == ""
    # The link names its nodes, so one registered without a name cannot pick one (else it could take any name).
    assert ids.check(8, "hospital-b") == "node 8 answered as hospital-b but was registered at the link without a name"
    unnamed = Identities()
    unnamed.learn([Node(8, "")])
    assert unnamed.check(8, "anything") == ""  # no node has a name (simulation, insecure): first use


def test_a_node_the_link_no_longer_lists_frees_its_name():
    # An insecure SuperNode makes a new key when it restarts and comes back under a new node id.
    ids = Identities()
    assert ids.check(1, "a") == ""
    assert ids.check(2, "a") == "node 2 answered as a, a name node 1 holds in this run"
    ids.forget([1])
    assert ids.check(2, "a") == "" and ids.name_of == {2: "a"}


def test_the_registry_binds_each_name_to_its_key(tmp_path):
    paths = make_certs(tmp_path / "certs", ["hospital-a", "hospital-b"])
    registry = load_registry(tmp_path / "certs" / "registry.toml")
    assert sorted(registry) == ["hospital-a", "hospital-b"]
    key_a, key_b = (pem_of(paths.site_keys[s][1]) for s in ("hospital-a", "hospital-b"))
    ids = Identities(registry)
    # b's node, registered at the link under a's name (an open Control API would allow it), is still refused.
    ids.learn([Node(1, "hospital-a", key_b), Node(2, "hospital-a", key_a), Node(3, "", b""), Node(4, "x", key_a)])
    assert ids.check(1, "hospital-a") == "node 1 answered as hospital-a without hospital-a's registered key"
    assert ids.check(3, "hospital-b") == "node 3 answered as hospital-b without hospital-b's registered key"
    assert ids.check(4, "mallory") == "node 4 answered as mallory, which is not in the site registry"
    assert ids.check(2, "hospital-a") == ""


def test_certs_adds_new_sites_to_the_same_registry(tmp_path):
    make_certs(tmp_path, ["a"])
    make_certs(tmp_path, ["a", "b"], overwrite=True)
    assert sorted(load_registry(tmp_path / "registry.toml")) == ["a", "b"]


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("[sites\n", "is not TOML"),
    ("[other]\na = 1\n", "has no [sites] table"),
    ('[sites]\na = "not a key"\n', "[sites] a is not an OpenSSH public key line"),
])
def test_a_bad_registry_is_an_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "registry.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=r"server.site-registry: .*registry.toml") as e:
        load_registry(path)
    assert message in str(e.value)
