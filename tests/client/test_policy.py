"""A site's own policy: where it comes from (never the run config), and the instructions it makes a site refuse."""

from uuid import uuid4

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client import client_app
from client.policy import load_policy
from client.site import NOT_PRIVATE
from common import records
from common.model import build_model, trainable_state
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 42, 1


def test_defaults_then_the_sites_policy_file_then_its_node_config(tmp_path):
    site = tmp_path / "hospital-a"
    site.mkdir()
    p = load_policy(site, {})
    assert (p.epsilon_cap, p.delta, p.min_noise_multiplier, p.allow_non_dp) == (16.0, 0.0, 0.5, False)
    (tmp_path / "policy.toml").write_text("epsilon-cap = 20.0\nallow-non-dp = true\n")  # shared by simulated sites
    assert load_policy(site, {}).epsilon_cap == 20.0 and load_policy(site, {}).allow_non_dp
    (site / "policy.toml").write_text("epsilon-cap = 3.0\n")  # the site's own file wins over the shared one
    assert load_policy(site, {}).epsilon_cap == 3.0 and not load_policy(site, {}).allow_non_dp
    node = load_policy(site, {"epsilon-cap": "4.5", "min-noise-multiplier": 0.8, "site-name": "hospital-a"})
    assert (node.epsilon_cap, node.min_noise_multiplier) == (4.5, 0.8) and node.source.endswith("+ node config")
    (site / "policy.toml").write_text("epsilon-cap = 'lots'\n")
    with pytest.raises(ValueError, match="epsilon-cap = 'lots' is not a float"):
        load_policy(site, {})
    (site / "policy.toml").write_text("budget = 3\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) budget"):
        load_policy(site, {})


def test_the_sites_delta_is_1e_5_or_a_power_of_ten_below_one_over_ten_n_of_its_released_size(tmp_path):
    p = load_policy(tmp_path, {})
    assert p.site_delta(150.0) == 1e-5 and p.site_delta(9_000.0) == 1e-5
    assert p.site_delta(20_000.0) == 1e-6 and p.site_delta(2e6) == 1e-8
    assert load_policy(tmp_path, {"delta": 1e-7}).site_delta(150.0) == 1e-7


def _train(run_config, state_dir, node_config=None, run_id="r"):
    from common.config import AppConfig

    cfg = AppConfig.from_run_config(TINY)
    arrays = trainable_state(build_model(cfg.model, cfg.data.labels, seed=0))
    ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3,
                                                      "state-dir": str(state_dir), **(node_config or {})},
                  state=RecordDict(), run_config=run_config)
    msg = Message(content=records.pack_instruction(arrays, 1, 2, run_id=run_id), message_type=MessageType.TRAIN,
                  dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    return records.unpack_train_reply(client_app.app(msg, ctx).content)


@pytest.mark.parametrize("run_config, node_config, reason", [
    ({"dp.enabled": False}, {}, "takes part in no run without DP (its policy: allow-non-dp = false)"),
    ({"dp.target-delta": 1e-3}, {}, "dp.target-delta = 0.001 is above this site's δ = 1e-05 (its policy)"),
    ({"dp.noise-multiplier": 0.3}, {}, "dpsgd noise multiplier 0.3 is below this site's minimum 0.5"),
    ({"dp.census-noise-multiplier": 0.2}, {}, "census noise multiplier 0.2 is below this site's minimum 0.5"),
    ({"dp.target-epsilon": 8.0}, {"epsilon-cap": 0.1}, "lifetime ε on this data to 0.538"),  # the census
])
def test_whatever_the_run_asks_a_site_refuses_what_breaks_its_policy(tmp_path, run_config, node_config, reason):
    reply = _train({**TINY, **run_config}, tmp_path / "site", node_config)
    assert reply.site.status == records.STATUS_REFUSED and reason in reply.site.reason
    assert reply.arrays is None


def test_a_site_that_allows_it_takes_a_non_dp_run_and_then_has_no_dp_guarantee_left(tmp_path, site_data):
    reply = _train({**TINY, "dp.enabled": False}, tmp_path / "site", {"allow-non-dp": True})
    assert reply.site.status == records.STATUS_OK and reply.epsilon == NOT_PRIVATE
    assert reply.num_examples == len(site_data.train) and reply.site.census_noise == 0.0
    # Exact values left the site: its ledger says so, and no later DP run can claim a finite ε on that data.
    later = _train(TINY, tmp_path / "site", {"allow-non-dp": True}, run_id="a-later-run")
    assert later.site.status == records.STATUS_REFUSED and "no DP guarantee is left" in later.site.reason
