"""The worker, its kill -9 restart, the lookup API and the monitor's history on a REAL 3-node Redis Cluster.

The cluster is three cluster-mode `redis-server`s on free ports (`embedded.start_redis_cluster`), the
broker the conftest's Tansu. The single-Redis tests of tests/test_worker.py and tests/test_api.py run
here unchanged, on settings whose `STREAMREC_REDIS_URL` names the cluster and whose key prefix puts the
partitions' hash tags on different nodes, so every run crosses nodes; each test then checks that the
partitions' keys really sit on more than one node.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

import tests.test_api as single_api
import tests.test_shared_items as shared
import tests.test_worker as single
from stream_app.core.errors import ConfigError, ServiceError
from stream_app.core.events import prepare
from stream_app.core.settings import Settings, redact
from stream_app.dev import embedded
from stream_app.io.redis import Changes, Keys, PartitionStore, cluster_nodes, connect, reachable, read_snapshot
from stream_app.monitor.history import RedisHistory
from stream_app.serving.api import create_app
from stream_app.serving.cache import ModelCache
from stream_app.serving.client import RecommenderClient
from stream_app.worker.config import WorkerConfig
from stream_app.worker.status import partition_status
from stream_app.worker.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    servers = embedded.start_redis_cluster([embedded.free_port() for _ in range(3)], tmp_path_factory.mktemp("cluster"))
    yield servers
    servers.stop()


def on_cluster(settings: Settings, cluster) -> Settings:
    """`settings` with the cluster as Redis and a key prefix whose partitions' hash tags sit on more
    than one node (a random prefix puts 2 partitions on one node a third of the time)."""
    client = connect(cluster.url)

    def owners(prefix: str) -> set[str]:
        return {client.get_node_from_key(Keys(prefix, settings.events_topic, p).tag).name
                for p in range(settings.events_partitions)}

    prefix = next(p for p in (f"{settings.key_prefix}-{j}" for j in itertools.count()) if len(owners(p)) > 1)
    return settings.with_(redis_url=cluster.url, key_prefix=prefix)


def nodes_holding(settings: Settings) -> set[str]:
    """The cluster nodes holding keys of `settings`' partitions (a SCAN of each primary)."""
    client = connect(settings.redis_url)
    pattern = f"\\{{{settings.key_prefix}:*"
    return {node.name for node in client.get_primaries()
            if next(iter(client.scan_iter(match=pattern, count=1000, target_nodes=node)), None) is not None}


@pytest.fixture
def settings(topics, cluster) -> Settings:
    return on_cluster(topics, cluster)


def test_a_cluster_url_names_seed_nodes_and_keeps_user_password_and_tls_options():
    first, others = cluster_nodes("rediss+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]/0?ssl_ca_certs=/ca.pem")
    assert first == "rediss://app:s3cret@10.0.0.1:7000/0?ssl_ca_certs=/ca.pem"
    assert [(n.host, n.port) for n in others] == [("10.0.0.2", 7001), ("::1", 6379)]
    assert cluster_nodes("redis+cluster://h1:1,h2:2")[0] == "redis://h1:1"
    assert redact("redis+cluster://app:s3cret@h1:1,h2:2") == "redis+cluster://app:***@h1:1,h2:2"
    with pytest.raises(ConfigError, match="only database 0"):
        connect("redis+cluster://h1:1,h2:2/3")
    with pytest.raises(ConfigError, match="not HOST:PORT") as err:
        connect("redis+cluster://app:s3cret@h1:1,h2:port")
    assert "s3cret" not in str(err.value)


def test_a_cluster_that_is_down_is_waited_for_by_the_worker_and_a_503_for_the_api(services):
    dead = f"redis+cluster://127.0.0.1:{embedded.free_port()},127.0.0.1:{embedded.free_port()}"
    client = connect(dead, timeout=0.5)  # no network yet: a worker or API starts while the cluster is down
    with pytest.raises(redis.ConnectionError, match="no seed node"):
        client.get("x")
    with pytest.raises(ServiceError, match="not reachable"), reachable(dead):  # the worker suspends and retries
        client.get("x")
    cache = ModelCache(services.with_(redis_url=dead), background=False, timeout=0.5)
    with pytest.raises(ServiceError, match="not answering"):  # the API answers 503
        cache.shard(0)
    cache.refresh()
    assert cache.status()[0] is not None and "not answering" in cache.status()[0]


def test_the_cluster_spreads_partitions_over_its_nodes(cluster):
    client = connect(cluster.url)
    assert len(client.get_primaries()) == 3
    owners = {client.get_node_from_key(Keys("sr", "events", p).tag).name for p in range(64)}
    assert len(owners) == 3, "64 partitions' hash tags all on fewer than 3 nodes: the slots are not split"
    for p in range(4):  # every key of a partition, whatever its name, in its tag's slot
        keys = Keys("sr", "events", p)
        names = [keys.offset, keys.owner, keys.dedup, keys.vocab("item"), keys.table("gru", "session"),
                 keys.session_row("gru", "session", 12)]
        assert {client.keyslot(n) for n in names} == {client.keyslot(keys.tag)}


def test_every_event_is_applied_once_across_nodes(settings):
    single.test_every_event_applied_once_and_metrics_published(settings, "kafka-python")
    assert len(nodes_holding(settings)) > 1
    rows = partition_status(settings)  # `streamrec status` reads the cluster too
    assert [r.partition for r in rows] == [0, 1] and all(r.worker and r.lag == 0 for r in rows), rows
    assert sum(r.applied for r in rows) == single.applied(settings) == 3000


def test_kill_9_mid_stream_then_restart_applies_every_event_exactly_once(settings, tmp_path):
    single.test_kill_9_mid_stream_then_restart_applies_every_event_exactly_once(settings, tmp_path, "kafka-python")
    assert len(nodes_holding(settings)) > 1


def test_shared_items_fold_across_nodes(settings):
    """The shared vocabulary's slot, and each partition's item log in its own slot, on several nodes."""
    shared.test_shards_fold_each_others_item_changes_into_equal_replicas(settings)
    assert len(nodes_holding(settings)) > 1


def test_a_fenced_zombie_publishes_no_item_changes_on_the_cluster(settings):
    shared.test_a_fenced_zombie_publishes_no_item_changes(settings)


def test_kill_9_with_shared_items_applies_every_item_change_once_on_the_cluster(settings, tmp_path):
    shared.test_kill_9_with_shared_items_applies_every_item_change_once(settings, tmp_path, "kafka-python")


def test_fencing_and_the_dedup_window_hold_on_the_cluster(settings):
    single.test_a_fenced_worker_cannot_commit(settings)
    single.test_dedup_window_is_trimmed_by_whole_commits_and_survives_a_reload(settings)


def test_session_rows_come_back_with_mget_and_a_scan_of_every_node(settings):
    """Session rows (GRU hidden states) are one key each: a worker reads them back with MGET (one slot),
    a snapshot finds them with a SCAN of every node."""
    client = connect(settings.redis_url)
    keys = Keys(settings.key_prefix, settings.events_topic, 0)
    store = PartitionStore(client, keys)
    store.claim()
    rows, values = np.arange(6) * 3, np.random.default_rng(0).random((6, 4), np.float32)
    store.commit(Changes(1, 0, {}, {}, {}, [], {}, [("gru", "session", "session", rows, values)]))
    got = store.session_rows_of("gru", "session", np.array([3, 4, 15]))  # row 4 was never written
    assert np.array_equal(got, np.stack([values[1], np.zeros(4, np.float32), values[5]]))
    table = read_snapshot(client, keys, {"gru": {"session": "session"}}).models["gru"]["session"]
    assert table.shape == (16, 4) and np.array_equal(table[rows], values) and not table[1].any()


def test_the_monitor_history_is_kept_in_the_cluster(cluster):
    first = RedisHistory(cluster.url, "sr-monitor-test", "metrics")
    first.push_point("pop", {"recall": 0.5})
    first.push_point("mf", {"recall": 0.25})
    first.push_alert({"kind": "drop"})
    first.push_lag({"lag": 3})
    points, alerts, lag = RedisHistory(cluster.url, "sr-monitor-test", "metrics").load()  # as after a restart
    assert points == {"mf": [{"recall": 0.25}], "pop": [{"recall": 0.5}]}
    assert alerts == [{"kind": "drop"}] and lag == [{"lag": 3}]


def test_worker_and_api_on_a_cluster_with_an_acl_user_and_tls(topics, tmp_path):
    """TLS with client certificates on every node and the cluster bus, and test_transport's ACL user
    (the project's keys only): the URL's user, password and `ssl_*` options reach every node."""
    from tests.test_transport import ADMIN, SECRET, make_certs

    certs = make_certs(tmp_path / "certs")
    secured = embedded.start_redis_cluster(
        [embedded.free_port() for _ in range(3)], tmp_path / "cluster", password=ADMIN,
        tls=(certs / "server.pem", certs / "server.key", certs / "ca.pem"),
        extra_args=("--requirepass", ADMIN, "--user", "streamrec", "on", f">{SECRET}", "~{sr:*", "~sr:*", "&sr:*", "+@all",
                    "-@dangerous"))
    try:
        query = f"ssl_ca_certs={certs / 'ca.pem'}&ssl_certfile={certs / 'client.pem'}&ssl_keyfile={certs / 'client.key'}"
        url = secured.tls_url.replace("://", f"://streamrec:{SECRET}@") + f"?{query}"
        settings = topics.with_(redis_url=url, key_prefix="sr")
        n = single.produce(settings, single.events(300))
        Worker(settings, WorkerConfig(models=("pop",))).run(max_idle=3)
        assert single.applied(settings) == n
        assert all(node.port in secured.tls_ports for node in connect(url).get_primaries())  # TLS to every node
        cache = ModelCache(settings, ("pop",), background=False)
        assert sum(view.version for view in cache.views()) > 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            connect(url).set("not-streamrec", 1)  # outside the key prefix
        wrong = ModelCache(settings.with_(redis_url=url.replace(SECRET, "wrong")), ("pop",), background=False)
        with pytest.raises(ServiceError) as error:
            wrong.ping()
        assert "wrong" not in str(error.value) and SECRET not in str(error.value)
    finally:
        secured.stop()


@pytest.fixture(scope="module")
def planted(embedded_servers, cluster, tmp_path_factory):
    """test_api's planted state, written by a real worker into the cluster."""
    import uuid

    tag = uuid.uuid4().hex[:12]
    settings = on_cluster(embedded_servers.settings(
        events_topic=f"events-{tag}", metrics_topic=f"metrics-{tag}", dlq_topic=f"events.dlq-{tag}",
        alerts_topic=f"alerts-{tag}", consumer_group=f"group-{tag}", key_prefix=f"sr-{tag}",
        state_dir=tmp_path_factory.mktemp("api-state"),
    ), cluster)
    single_api.kafka.ensure_topics(single_api.kafka.target(settings), embedded.topic_partitions(settings))
    single_api.produce(settings, single_api.planted_events())
    Worker(settings, WorkerConfig(models=("pop",))).run(max_idle=3)
    return settings


@pytest.fixture(scope="module")
def api(planted):
    with TestClient(create_app(planted.with_(api_models="pop", api_refresh=0.1))) as http:
        yield RecommenderClient("http://testserver", client=http)


def test_the_api_answers_from_state_the_worker_wrote_into_the_cluster(api, planted):
    assert len(nodes_holding(planted)) > 1
    single_api.test_known_user_excludes_seen_items_and_reasons_point_at_her_history(api, planted)
    single_api.test_unknown_user_gets_popularity_in_context_and_context_changes_the_answer(api)
    single_api.test_sessions_known_and_unknown(api)
    single_api.test_similar_items_by_cooccurrence_across_shards(api)  # both shards, on different nodes


def test_the_api_follows_new_commits_in_the_cluster(api, planted):
    user = "late-user"
    partition = single_api.kafka.partition_for(user.encode(), planted.events_partitions)
    single_api.produce(planted, [prepare({"user_id": user, "item_id": "B4", "event_type": "purchase",
                                          "ts": time.time(), "context": {"device": "android"}})])
    Worker(planted, WorkerConfig(models=("pop",))).run(max_idle=3)
    version = int(connect(planted.redis_url).get(Keys(planted.key_prefix, planted.events_topic, partition).version))
    deadline = time.monotonic() + 30
    while (answer := api.recommendations(user, k=3))["model_version"] < version:
        assert time.monotonic() < deadline, f"the API never loaded version {version}: {answer}"
        time.sleep(0.05)
    assert {i["reason"]["item_id"] for i in answer["items"]} == {"B4"}, answer
