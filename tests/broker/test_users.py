"""Users and permissions (RELIABILITY.md A3, A4): the users file, the check
at every entry point, and reloading it under live connections."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.users import Login, Rights, load_users
from client import AuthFailed, Client, PermissionDenied
from client.cli.commands import render_status
from protocol import ConfigError, Err, ErrorCode, Nack, Progress, check_queue
from tests.helpers import BrokerProcess, RawPeer, broker_process, running_broker, url_of

ADMIN = "admin-token-0123"
ORDERS = "orders-token-0123"

USERS = f"""
[users.admin]
token = "{ADMIN}"
publish = ["*"]
subscribe = ["*"]
delete = ["*"]
status = true

[users.orders]
token_sha256 = "{hashlib.sha256(ORDERS.encode()).hexdigest()}"
publish = ["orders", "orders.*"]
subscribe = ["billing"]
"""


def _users_file(tmp_path: Path, text: str = USERS) -> Path:
    path = tmp_path / "users.toml"
    path.write_text(text)
    return path


def _who(login: Login | None) -> str | None:
    """The name of the user a token authenticated as (None: refused)."""
    return None if login is None else login.name


async def _queues(admin: Client) -> dict[str, int]:
    """Queue name -> next offset, as STATUS shows them."""
    return {q["name"]: q["next_offset"] for q in (await admin.status())["queues"]}


# --- the users file ---------------------------------------------------------------


def test_users_file_is_read(tmp_path: Path) -> None:
    users = load_users(_users_file(tmp_path))
    assert sorted(users.by_name) == ["admin", "orders"]
    assert _who(users.authenticate(ADMIN)) == "admin"
    assert _who(users.authenticate(ORDERS)) == "orders"  # by its hash
    for wrong in (None, 7, "", ORDERS + "x", ORDERS[:-1], hashlib.sha256(ORDERS.encode()).hexdigest()):
        assert users.authenticate(wrong) is None
    orders = users.by_name["orders"]
    assert not orders.status and orders.delete.patterns == ()
    assert orders.publish("orders.eu") and not orders.subscribe("orders")


def test_a_user_may_have_several_tokens(tmp_path: Path) -> None:
    """``token`` and ``token_sha256`` take a string or a list, and a user may
    have both: each token authenticates as the user, and says which it was."""
    new_hash = hashlib.sha256(b"orders-token-new").hexdigest()
    text = USERS.replace(
        f'token_sha256 = "{hashlib.sha256(ORDERS.encode()).hexdigest()}"',
        f'token = ["orders-token-clear", "{ORDERS}"]\ntoken_sha256 = ["{new_hash}"]',
    )
    users = load_users(_users_file(tmp_path, text))
    for token in (ORDERS, "orders-token-clear", "orders-token-new"):
        login = users.authenticate(token)
        assert login is not None and login.name == "orders", token
        assert login.token_hash == hashlib.sha256(token.encode()).digest()
        assert login.publish("orders.eu") and not login.subscribe("orders")  # the user's rights
    assert len(users.by_name["orders"].token_hashes) == 3
    assert users.clear_tokens == 3  # (admin's one and orders' two)
    for wrong in ("orders-token-clea", new_hash, "admin-token-012"):
        assert users.authenticate(wrong) is None
    # The same token in the clear and as its hash is one token, not a clash.
    same = f'[users.a]\ntoken = "{ORDERS}"\ntoken_sha256 = "{hashlib.sha256(ORDERS.encode()).hexdigest()}"\n'
    assert load_users(_users_file(tmp_path, same)).by_name["a"].token_hashes == (
        hashlib.sha256(ORDERS.encode()).digest(),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no users"),
        ("[users]", "no users"),
        ("[queues.x]\n", "unknown section(s) ['queues']"),
        ("[users.a\n", "users file"),  # not TOML
        ('[users.a]\npublish = ["x"]\n', "give a token or token_sha256"),
        ("[users.a]\ntoken = []\ntoken_sha256 = []\n", "give a token or token_sha256"),
        ('[users.a]\ntoken = "short"\n', "at least 8 characters"),
        ('[users.a]\ntoken = ["long-enough", "short"]\n', "at least 8 characters"),
        ("[users.a]\ntoken = 12345678\n", "token must be a string or a list of strings"),
        ('[users.a]\ntoken = ["long-enough", 1]\n', "token must be a string or a list of strings"),
        ('[users.a]\ntoken_sha256 = "abc"\n', "64 hex digits"),
        ('[users.a]\ntoken_sha256 = ["' + "0" * 64 + '", "abc"]\n', "64 hex digits"),
        ('[users.a]\ntoken = "long-enough"\npublsh = ["x"]\n', "unknown key(s) ['publsh']"),
        ('[users.a]\ntoken = "long-enough"\npublish = "x"\n', "must be a list"),
        ('[users.a]\ntoken = "long-enough"\npublish = ["../x"]\n', "'../x'"),
        ('[users.a]\ntoken = "long-enough"\nsubscribe = ["a/b"]\n', "'a/b'"),
        ('[users.a]\ntoken = "long-enough"\nstatus = "yes"\n', "status must be true or false"),
        ('[users."a b"]\ntoken = "long-enough"\n', "user name"),
        (
            '[users.a]\ntoken = "long-enough"\n[users.b]\ntoken = "long-enough"\n',
            "users 'a' and 'b' have the same token; a token names one user",
        ),
        (  # one of several, and once in the clear, once as its hash
            '[users.a]\ntoken = ["a-token-0123", "long-enough"]\n'
            f'[users.b]\ntoken_sha256 = ["{"0" * 64}", "{hashlib.sha256(b"long-enough").hexdigest()}"]\n',
            "users 'a' and 'b' have the same token",
        ),
    ],
)
def test_a_bad_users_file_is_refused_with_where_and_why(tmp_path: Path, text: str, message: str) -> None:
    path = _users_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_missing_users_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_users(tmp_path / "nope.toml")


QUEUE_NAMES = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,12}", fullmatch=True)
QUEUE_PATTERNS = st.from_regex(r"[A-Za-z0-9_*-][A-Za-z0-9._*-]{0,8}", fullmatch=True) | st.sampled_from(
    ["*", "a*", "*.dead", "a.*", "A", "a"]
)


@given(st.lists(QUEUE_PATTERNS, max_size=4), QUEUE_NAMES)
def test_rights_match_exactly_as_a_shell_glob_of_star_alone(patterns: list[str], queue: str) -> None:
    """A queue is allowed iff some pattern matches it whole, case-sensitively,
    with ``*`` the only wildcard (queue names hold no other glob character)."""
    assert check_queue(queue) is None
    expected = any(fnmatch.fnmatchcase(queue, p) for p in patterns)
    assert Rights(tuple(patterns))(queue) is expected


@pytest.mark.parametrize(
    ("queue", "allowed"),
    [
        ("orders", True),
        ("orders.eu", True),
        ("orders.eu.dead", True),
        ("orders.", True),  # (* matches the empty run too)
        ("Orders", False),
        ("ORDERS.eu", False),
        ("orders-eu", False),
        ("xorders.eu", False),
        ("order", False),
        ("ordersx", False),
    ],
)
def test_rights_compare_names_exactly(queue: str, allowed: bool) -> None:
    assert Rights(("orders", "orders.*"))(queue) is allowed


# --- the checks, entry point by entry point ------------------------------------------


async def test_publish_without_permission_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    """A3: PERMISSION_DENIED for that request; nothing stored, no queue
    created; the connection goes on for the queues it may publish to."""
    async with (
        running_broker(tmp_path, users_file=_users_file(tmp_path)) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token=ORDERS, name="orders-app") as orders,
    ):
        assert await orders.publish("orders", "created", b"1") == 0
        with pytest.raises(PermissionDenied) as info:
            await orders.publish("billing", "created", b"2")  # the spliced fast path
        assert info.value.code == ErrorCode.PERMISSION_DENIED
        assert str(info.value) == "PERMISSION_DENIED: user 'orders' has no publish right on queue 'billing'"
        with pytest.raises(PermissionDenied):
            await orders.publish("secret", "created", b"3", headers={"h": "v"}, message_id="m1")  # the other path
        # One read with allowed and refused publishes mixed: each answered on its own.
        results = await asyncio.gather(
            *(
                orders.publish(q, "e", i)
                for i, q in enumerate(["orders.eu", "billing", "orders.eu", "Orders", "orders"])
            ),
            return_exceptions=True,
        )
        assert results[0] == 0 and results[2] == 1 and results[4] == 1
        assert all(isinstance(results[i], PermissionDenied) for i in (1, 3))
        assert await _queues(admin) == {"orders": 2, "orders.eu": 2}
        assert not (tmp_path / "queues" / "billing").exists() and not (tmp_path / "queues" / "secret").exists()
        assert orders.reconnects == 0  # the refusals never cost the connection
        connections = {c["name"]: c for c in (await admin.status())["connections"]}
        assert connections["orders-app"]["user"] == "orders"
        # Which token (for a rotation): the start of its SHA-256, as the file has it.
        assert connections["orders-app"]["token"] == hashlib.sha256(ORDERS.encode()).hexdigest()[:8]
        status = render_status(await admin.status())
        assert f"orders ({hashlib.sha256(ORDERS.encode()).hexdigest()[:8]})" in status


async def test_every_consuming_entry_point_checks_the_subscribe_right(tmp_path: Path) -> None:
    """A4: SUBSCRIBE (durable and not), FETCH (durable and plain), ACK, NACK,
    PROGRESS, SEEK: refused without the right, before anything is looked up
    or created (so an unknown durable is not told apart from a known one)."""
    async with (
        running_broker(tmp_path, users_file=_users_file(tmp_path)) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token=ORDERS) as orders,
    ):
        await admin.publish("audit", "e", b"x")
        admin_sub = await admin.subscribe("audit", durable="auditor", start="earliest")
        assert (await admin_sub.next(timeout=5)).payload == b"x"
        await admin_sub.close()
        before = await admin.status()

        refusals = [
            orders.subscribe("audit"),
            orders.subscribe("audit", durable="auditor", start="earliest"),
            orders.subscribe("audit", durable="new-one"),
            orders.fetch("audit"),
            orders.fetch("audit", durable="auditor"),
            orders.ack_upto("audit", "auditor", 0),
            orders.ack_upto("audit", "nobody", 0),
            orders.seek("audit", "auditor", "earliest"),
            orders.fetch("never-made"),
            orders.subscribe("never-made", durable="d"),
        ]
        for call in refusals:
            with pytest.raises(PermissionDenied, match="has no subscribe right on queue"):
                await call
        peer = await RawPeer.connect(broker, token=ORDERS)
        peer.send_frame(Nack(7, "audit", "auditor", (0,), 0))
        peer.send_frame(Progress(8, "audit", "auditor", (0,)))
        for req in (7, 8):
            reply = await peer.recv()
            assert isinstance(reply, Err) and (reply.req, reply.code) == (req, ErrorCode.PERMISSION_DENIED)
        peer.close()

        after = await admin.status()
        for status in (before, after):
            for queue in status["queues"]:
                del queue["publish_rate"]  # (the one figure that moves by itself)
        assert after["queues"] == before["queues"] and after["durables"] == before["durables"]
        assert not (tmp_path / "queues" / "never-made").exists()
        # The subscribe right, on the other hand, opens every one of them.
        await admin.publish("billing", "due", b"1")
        sub = await orders.subscribe("billing", durable="biller", start="earliest")
        msg = await sub.next(timeout=5)
        await msg.ack(wait=True)
        await sub.close()
        await orders.seek("billing", "biller", "earliest")
        assert [m.payload for m in await orders.fetch("billing")] == [b"1"]
        assert orders.reconnects == 0


async def test_delete_and_status_need_their_own_rights(tmp_path: Path) -> None:
    async with (
        running_broker(tmp_path, users_file=_users_file(tmp_path)) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token=ORDERS) as orders,
    ):
        await orders.publish("orders", "e")
        await (await orders.subscribe("billing", durable="biller")).close()
        with pytest.raises(PermissionDenied, match="has no delete right on queue 'orders'"):
            await orders.delete_queue("orders")  # publishing to it is not enough
        with pytest.raises(PermissionDenied, match="has no delete right on queue 'billing'"):
            await orders.delete_durable("billing", "biller")  # nor consuming from it
        with pytest.raises(PermissionDenied, match="has no delete right on queue 'nothing'"):
            await orders.delete_queue("nothing")  # (not NOT_FOUND: no probing)
        with pytest.raises(PermissionDenied, match="may not ask for STATUS"):
            await orders.status()
        assert await _queues(admin) == {"orders": 1, "billing": 0}
        await admin.delete_durable("billing", "biller")
        await admin.delete_queue("orders")
        assert await _queues(admin) == {"billing": 0}


async def test_a_dead_letter_queue_needs_the_publish_right(tmp_path: Path) -> None:
    """A subscription with max_deliveries writes to its dead-letter queue:
    without the publish right there, a consumer could store records in any
    queue by naming it (the entry point NATS CVE-2026-33217 is about)."""
    text = USERS.replace('subscribe = ["billing"]', 'subscribe = ["billing", "jobs"]').replace(
        'publish = ["orders", "orders.*"]', 'publish = ["orders", "orders.*", "jobs.dead"]'
    )
    async with (
        running_broker(tmp_path, users_file=_users_file(tmp_path, text)) as broker,
        Client(url_of(broker), token=ORDERS) as orders,
        Client(url_of(broker), token=ADMIN) as admin,
    ):
        with pytest.raises(PermissionDenied, match=r"no publish right on queue 'billing\.dead'"):
            await orders.subscribe("billing", durable="b", max_deliveries=3)
        with pytest.raises(PermissionDenied, match="no publish right on queue 'audit'"):
            await orders.subscribe("billing", durable="b", max_deliveries=3, dead_letter="audit")
        with pytest.raises(PermissionDenied, match="no publish right on queue 'audit'"):
            await orders.subscribe("billing", durable="b", dead_letter="audit")
        assert "billing" not in await _queues(admin)  # (refused before the queue was made)
        # Its own dead-letter queue, or one it may publish to, is fine.
        await (await orders.subscribe("jobs", durable="j", max_deliveries=3)).close()
        await (await orders.subscribe("billing", durable="b", max_deliveries=3, dead_letter="orders.dead")).close()
        # A durable whose dead-letter queue an admin chose: attaching without
        # changing it needs no publish right there; changing the count does.
        await (await admin.subscribe("billing", durable="adm", max_deliveries=2, dead_letter="audit")).close()
        await (await orders.subscribe("billing", durable="adm")).close()
        with pytest.raises(PermissionDenied, match="no publish right on queue 'audit'"):
            await orders.subscribe("billing", durable="adm", max_deliveries=5)


async def test_authentication_with_users(tmp_path: Path) -> None:
    async with running_broker(tmp_path, users_file=_users_file(tmp_path)) as broker:
        for token in (None, "wrong-token", ORDERS.upper()):
            with pytest.raises(AuthFailed):
                await Client.open(url_of(broker), token=token, reconnect=False)
        async with Client(url_of(broker), token=ADMIN, name="ops") as admin:
            (conn,) = [c for c in (await admin.status())["connections"] if c["name"] == "ops"]
            assert conn["user"] == "admin"


def test_token_and_users_together_are_refused(tmp_path: Path) -> None:
    from broker import BrokerConfig

    with pytest.raises(ConfigError, match="not both"):
        BrokerConfig(token="s3cret-token", users_file=_users_file(tmp_path))


async def test_a_bad_users_file_stops_the_start_before_the_data_dir_is_touched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(ConfigError, match="unknown key"):
        async with running_broker(data, users_file=_users_file(tmp_path, '[users.a]\ntoken = "long-enough"\nx = 1\n')):
            pass
    assert not data.exists()


# --- reloading ---------------------------------------------------------------------------


async def test_reload_closes_removed_users_and_reconnects_narrowed_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A4, permission revoked between reconnects: a removed user's connection
    ends with AUTH_FAILED and its token is refused from then on; a user whose
    rights shrank reconnects, and its subscription that is no longer allowed
    ends with PERMISSION_DENIED while the others go on; a user whose rights
    grew keeps its connection and may use them at once."""
    path = _users_file(tmp_path, USERS + '\n[users.ops]\ntoken = "ops-token-0123"\nsubscribe = ["jobs"]\n')
    caplog.set_level(logging.INFO, logger="broker")
    async with (
        running_broker(tmp_path, users_file=path) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token="ops-token-0123") as ops,
        Client(url_of(broker), token=ORDERS, name="orders-app") as orders,
    ):
        path.write_text(USERS.replace('subscribe = ["billing"]', 'subscribe = ["billing", "audit"]'))
        assert orders.reconnects == 0
        lost = await orders.subscribe("billing", durable="biller")
        kept_conn = orders.conn_id

        # Widened (orders) and removed (ops), in one reload.
        assert broker.reload_users()
        with pytest.raises(AuthFailed, match="user 'ops' was removed"):
            await ops.publish("jobs", "e")
        with pytest.raises(AuthFailed):
            await Client.open(url_of(broker), token="ops-token-0123", reconnect=False)
        await (await orders.subscribe("audit")).close()  # allowed at once, on the same connection
        assert orders.conn_id == kept_conn and orders.reconnects == 0

        # Narrowed: billing is no longer allowed, audit still is.
        path.write_text(USERS.replace('subscribe = ["billing"]', 'subscribe = ["audit"]'))
        kept = await orders.subscribe("audit", durable="auditor")
        assert broker.reload_users()
        with pytest.raises(PermissionDenied, match="no subscribe right on queue 'billing'"):
            await lost.next(timeout=10)
        await admin.publish("audit", "e", b"after")
        assert (await kept.next(timeout=10)).payload == b"after"  # resubscribed on the new connection
        assert orders.reconnects == 1
        await admin.publish("orders", "e")  # publishing was never touched
        assert await orders.publish("orders", "e") == 1

        # A file that cannot be used changes nothing.
        path.write_text("[users.orders]\n")
        assert not broker.reload_users()
        assert await orders.publish("orders", "e") == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("users not reloaded, the old ones stay in force" in m for m in messages)
    assert any("connections closed: 1 of removed users or tokens, 0 with narrowed rights" in m for m in messages)
    assert any("connections closed: 0 of removed users or tokens, 1 with narrowed rights" in m for m in messages)


async def test_a_narrowing_that_spares_what_a_connection_consumes_keeps_it(tmp_path: Path) -> None:
    """Rights narrowed on queues a connection is not consuming from leave it
    open: its subscription and its durable fetches go on, and its next
    requests meet the new rights (PERMISSION_DENIED on the same connection).
    (Any narrowing closed every connection of the user with
    PERMISSIONS_CHANGED, which ends a `tidings sub` on a queue it may still
    read; found by an operator walkthrough.)"""
    wide = USERS.replace('subscribe = ["billing"]', 'subscribe = ["billing", "audit"]')
    path = _users_file(tmp_path, wide)
    async with (
        running_broker(tmp_path, users_file=path) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token=ORDERS) as orders,
    ):
        sub = await orders.subscribe("billing", durable="b")
        assert await orders.fetch("billing", durable="p") == []
        conn = orders.conn_id
        path.write_text(USERS.replace('publish = ["orders", "orders.*"]', 'publish = ["orders"]'))  # no audit, orders.*
        assert broker.reload_users()
        await admin.publish("billing", "e", b"x")
        assert (await sub.next(timeout=10)).payload == b"x"
        with pytest.raises(PermissionDenied, match="no subscribe right on queue 'audit'"):
            await orders.fetch("audit")
        with pytest.raises(PermissionDenied, match=r"no publish right on queue 'orders\.eu'"):
            await orders.publish("orders.eu", "e")
        assert await orders.publish("orders", "e") == 0
        assert (orders.conn_id, orders.reconnects) == (conn, 0)


async def test_a_changed_token_is_refused_from_then_on(tmp_path: Path) -> None:
    path = _users_file(tmp_path)
    async with running_broker(tmp_path, users_file=path) as broker:
        async with Client(url_of(broker), token=ORDERS) as orders:
            path.write_text(USERS.replace(hashlib.sha256(ORDERS.encode()).hexdigest(),
                                          hashlib.sha256(b"new-orders-token").hexdigest()))  # fmt: skip
            assert broker.reload_users()
            with pytest.raises(AuthFailed):
                await orders.publish("orders", "e")
        with pytest.raises(AuthFailed):
            await Client.open(url_of(broker), token=ORDERS, reconnect=False)
        async with Client(url_of(broker), token="new-orders-token") as orders:
            assert await orders.publish("orders", "e") == 0


async def test_a_soft_token_rotation_closes_only_the_connections_of_the_old_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rotation of the users module's docstring: add the new token,
    reload, move the clients, remove the old one, reload. No connection
    notices the first reload; the second closes only those that presented
    the old token (AUTH_FAILED), and that token is refused from then on. A
    token given to another user closes the connections that presented it
    too. (A user had one token: changing it closed every connection of the
    user at the reload, those already moved included.)"""
    old_hash, new_hash = (hashlib.sha256(t.encode()).hexdigest() for t in (ORDERS, "orders-token-new"))
    path = _users_file(tmp_path)
    caplog.set_level(logging.INFO, logger="broker")
    async with (
        running_broker(tmp_path, users_file=path) as broker,
        Client(url_of(broker), token=ADMIN) as admin,
        Client(url_of(broker), token=ORDERS, name="old") as old,
    ):
        sub = await old.subscribe("billing", durable="biller")
        path.write_text(USERS.replace(f'"{old_hash}"', f'["{old_hash}", "{new_hash}"]'))
        assert broker.reload_users()
        async with Client(url_of(broker), token="orders-token-new", name="new") as new:
            await admin.publish("billing", "e", b"1")
            assert (await sub.next(timeout=10)).payload == b"1"  # the first reload went unnoticed
            assert await new.publish("orders", "e") == 0

            path.write_text(USERS.replace(f'"{old_hash}"', f'"{new_hash}"'))
            assert broker.reload_users()
            with pytest.raises(AuthFailed, match="user 'orders' no longer has this connection's token"):
                await old.publish("orders", "e")
            assert await new.publish("orders", "e") == 1
            assert (new.conn_id, new.reconnects) == (3, 0)
            with pytest.raises(AuthFailed):
                await Client.open(url_of(broker), token=ORDERS, reconnect=False)

            moved = USERS.replace(f'"{old_hash}"', '"' + "0" * 64 + '"').replace(
                f'token = "{ADMIN}"', f'token = "{ADMIN}"\ntoken_sha256 = "{new_hash}"'
            )
            path.write_text(moved)
            assert broker.reload_users()
            with pytest.raises(AuthFailed, match="user 'orders' no longer has this connection's token"):
                await new.publish("orders", "e")
            assert await admin.publish("orders", "e") == 2
    closed = [m for r in caplog.records if "users reloaded" in (m := r.getMessage())]
    assert [m.split("connections closed: ")[1] for m in closed] == [
        f"{n} of removed users or tokens, 0 with narrowed rights" for n in (0, 1, 1)
    ]


async def test_reload_without_a_users_file_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_broker(tmp_path) as broker:
        assert not broker.reload_users()
        assert not broker.reload()  # (SIGHUP's: the users file and the TLS files)
        async with Client(url_of(broker)) as c:
            assert await c.publish("Q", "e") == 0
    assert "no --users file to reload" in caplog.text
    assert "nothing to reload: no --users file and no TLS" in caplog.text


# --- the daemon: --users, SIGHUP, and the tidings tool ----------------------------------------


@pytest.mark.parametrize(
    ("users", "env", "message"),
    [
        ('[users.a]\ntoken = "long-enough"\nsubscribe = ["a/b"]\n', {}, "'a/b'"),
        (None, {}, "No such file"),
    ],
)
def test_the_daemon_refuses_to_start_with_a_bad_users_file(
    tmp_path: Path, users: str | None, env: dict[str, str], message: str
) -> None:
    path = _users_file(tmp_path, users) if users is not None else tmp_path / "missing.toml"
    cmd = [sys.executable, "-m", "broker", "--port", "0", "--data-dir", str(tmp_path / "data"), "--users", str(path)]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert got.returncode == 1 and message in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the data directory


def test_the_daemon_with_users_ignores_tidings_token_and_says_so(tmp_path: Path) -> None:
    """TIDINGS_TOKEN is also the ``tidings`` tool's: set in the shell that
    starts the broker with --users, it is ignored with a warning (the broker
    refused to start), and only the users file's tokens are taken."""
    path = _users_file(tmp_path)
    with broker_process(tmp_path / "data", "--users", str(path), env={"TIDINGS_TOKEN": "s3cret-token"}) as bp:

        async def check() -> None:
            with pytest.raises(AuthFailed):
                await Client.open(bp.url, token="s3cret-token", reconnect=False)
            async with Client(bp.url, token=ADMIN) as c:
                await c.ping()

        asyncio.run(check())
    assert any("TIDINGS_TOKEN is ignored: --users is given" in line for line in bp.log), bp.log


def _reloaded(bp: BrokerProcess, count: int) -> None:
    """Wait until the broker has logged its ``count``-th reload."""
    deadline = time.monotonic() + 10
    while sum("users reloaded from" in line for line in bp.log) < count:
        assert time.monotonic() < deadline, "".join(bp.log[-20:])
        time.sleep(0.01)  # polling the log for a condition, with a deadline


def test_sighup_revokes_a_token_for_the_running_connection_and_the_next(tmp_path: Path) -> None:
    """A4 against the daemon: SIGHUP re-reads the file; the removed user's
    open connection ends with AUTH_FAILED, and its token is refused on the
    next connection; the tool prints PERMISSION_DENIED and exits 3."""
    path = _users_file(tmp_path)
    with broker_process(tmp_path / "data", "--users", str(path)) as bp:
        tool = [sys.executable, "-m", "client.cat"]
        got = subprocess.run([*tool, "pub", "billing", "E", "1", "--url", bp.url, "--token", ORDERS],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert got.returncode == 3, got.stderr
        assert got.stderr == (
            "tidings: refused by the broker: PERMISSION_DENIED: user 'orders' has no publish right on queue 'billing'\n"
        )
        got = subprocess.run([*tool, "status", "--url", bp.url, "--token", ORDERS], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert (got.returncode, got.stderr) == (3, "tidings: refused by the broker: PERMISSION_DENIED: user 'orders' "
                                                   "may not ask for STATUS\n")  # fmt: skip
        got = subprocess.run([*tool, "status", "--url", bp.url, "--token", ADMIN], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        table = got.stdout.split("CONNECTIONS\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert table[0].split()[:4] == ["ID", "NAME", "USER", "PRODUCER"], got.stdout
        assert table[1].split()[1:3] == ["tidings-status", "admin"], got.stdout

        async def revoke() -> None:
            async with Client(bp.url, token=ORDERS) as orders:
                assert await orders.publish("orders", "e") == 0
                path.write_text(USERS.split("[users.orders]")[0])
                os.kill(bp.pid, signal.SIGHUP)
                await asyncio.to_thread(_reloaded, bp, 1)
                with pytest.raises(AuthFailed, match="user 'orders' was removed"):
                    await orders.publish("orders", "e")
            with pytest.raises(AuthFailed):
                await Client.open(bp.url, token=ORDERS, reconnect=False)
            async with Client(bp.url, token=ADMIN) as admin:
                assert await _queues(admin) == {"orders": 1}

        asyncio.run(revoke())
        assert bp.stop() == 0


async def test_clear_tokens_in_a_file_others_may_read_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hashed = f'[users.a]\ntoken_sha256 = "{hashlib.sha256(ORDERS.encode()).hexdigest()}"\n'
    for text, mode, warned in [
        (USERS, 0o644, True),
        (USERS, 0o600, False),
        (USERS, 0o640, True),
        (hashed, 0o644, False),
    ]:
        path = _users_file(tmp_path, text)
        path.chmod(mode)
        caplog.clear()
        async with running_broker(tmp_path / "data", users_file=path) as broker:
            assert broker.reload_users()
        found = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "in the clear" in r.getMessage()
        ]
        assert len(found) == (2 if warned else 0), (oct(mode), found)  # at start and at the reload
        if warned:
            assert found[0] == (
                f"users file {path} holds 1 token(s) in the clear and its group or others may read it: chmod 600 it, or use token_sha256"
            )
