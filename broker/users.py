"""Users, their tokens and what each may do to which queues.

With ``--users FILE`` every client authenticates with a token that names one
user of the file, and each request is checked against that user's rights
(RabbitMQ's configure/write/read split, NATS's per-user publish/subscribe
lists)::

    [users.orders]
    token_sha256 = "5e88...8d"          # SHA-256 of the token, in hex
    publish = ["orders", "orders.*"]    # PUBLISH
    subscribe = ["billing"]             # SUBSCRIBE, FETCH, ACK, NACK, PROGRESS, SEEK
    delete = []                         # DELETE of a queue or of its durables
    status = false                      # STATUS (every connection, queue and durable)

    [users.ops]
    token = "a-long-random-secret"      # the token itself (keep the file private)
    publish = ["*"]
    subscribe = ["*"]
    delete = ["*"]
    status = true

A list holds queue names and ``*`` patterns (``*`` matches any run of
characters, dots included: ``orders.*`` matches ``orders.eu.dead``, not
``orders``). Queue names are compared exactly: case matters and no name is
normalised (the alphabet has no ``/`` and no leading ``.``, so two spellings
never mean one queue). A missing list allows nothing; there are no deny rules.

A subscription that names a dead-letter queue (``max_deliveries``) writes to
it, so it also needs ``publish`` on that queue.

Several tokens: ``token`` and ``token_sha256`` each take a string or a list
of strings, and a user may have both keys; any of its tokens authenticates
as that user::

    [users.orders]
    token_sha256 = ["5e88...8d", "9f86...08"]   # the old token and the new one

That is how a token is changed without cutting anyone off (soft rotation):

1. add the new token beside the old one, and reload (SIGHUP): both work;
2. move the clients to the new token, at their own pace;
3. remove the old token, and reload: only the connections that authenticated
   with it are closed (AUTH_FAILED: their token is no longer good); the
   others carry on.

Each connection remembers which token it presented (its :class:`Login`) for
step 3. A token names one user: the same token under two users is refused
when the file is read, since it could not say which user a client is.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from protocol import ConfigError, EventFilter, check_queue

__all__ = ["Login", "Rights", "User", "Users", "load_users"]

_QUEUE_PATTERN_RE: Final = re.compile(r"[A-Za-z0-9_*-][A-Za-z0-9._*-]{0,127}")
_USER_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_LISTS: Final = ("publish", "subscribe", "delete")
_KEYS: Final = frozenset({"token", "token_sha256", "status", *_LISTS})


class Rights:
    """The queues one list (``publish``, ``subscribe`` or ``delete``) allows.

    Exact names are a set lookup and patterns linear-time globs (the same
    matcher as event filters), so no queue name makes a check slow.
    """

    __slots__ = ("_filter", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self._filter = EventFilter(patterns) if patterns else None

    def __call__(self, queue: str) -> bool:
        """Whether ``queue`` is allowed."""
        return self._filter is not None and self._filter(queue)

    def covers(self, other: Rights) -> bool:
        """Whether this list keeps every pattern of ``other`` (so it allows at
        least as much: a cheap, conservative test used on reload)."""
        return set(other.patterns) <= set(self.patterns)

    def __repr__(self) -> str:
        return f"Rights({list(self.patterns)!r})"


@dataclass(frozen=True, slots=True, eq=False)
class User:
    """One user of the users file.

    Attributes:
        name: the user's name (STATUS shows it beside each connection).
        token_hashes: SHA-256 of each of the user's tokens.
        publish: queues it may PUBLISH to.
        subscribe: queues it may consume from (SUBSCRIBE, FETCH, ACK, NACK,
            PROGRESS, SEEK).
        delete: queues it may DELETE, or delete durables of.
        status: whether it may ask for STATUS.
    """

    name: str
    token_hashes: tuple[bytes, ...]
    publish: Rights
    subscribe: Rights
    delete: Rights
    status: bool

    def keeps_rights_of(self, old: User) -> bool:
        """Whether this user (reloaded) may still do everything ``old`` could:
        then its connections carry on under the new rights."""
        return (self.status or not old.status) and all(
            getattr(self, kind).covers(getattr(old, kind)) for kind in _LISTS
        )

    def login(self, token_hash: bytes) -> Login:
        """This user as a connection that presented the token of ``token_hash``."""
        return Login(**{f.name: getattr(self, f.name) for f in fields(User)}, token_hash=token_hash)


@dataclass(frozen=True, slots=True, eq=False)
class Login(User):
    """A user as one connection authenticated: with which of its tokens.

    A connection's requests are checked against it as against its user (it
    is one). The token is what a reload looks at: the connection stays only
    while the file still gives that token to that user (see the module's
    docstring, soft rotation). One object, not a user with a token beside
    it, because a Session keeps fewer than 30 attributes (a 30th slows its
    every attribute access: see tests/broker/test_session.py).

    Attributes:
        token_hash: SHA-256 of the token the connection presented.
    """

    token_hash: bytes


class Users:
    """The users of one users file, found by token.

    Args:
        users: the users, no token shared by two of them.
        path: the file they came from (for messages and reloads).
    """

    def __init__(self, users: list[User], path: Path | None = None, *, clear_tokens: int = 0) -> None:
        self.path = path
        self.by_name = {user.name: user for user in users}
        self._logins = {digest: user.login(digest) for user in users for digest in user.token_hashes}
        #: How many tokens the file holds in the clear (``token``, not ``token_sha256``).
        self.clear_tokens = clear_tokens

    def exposed(self) -> str | None:
        """Why the file's clear tokens are at risk, or None: a file that its
        group or others may read (as ssh refuses a private key that others may read)."""
        if not self.clear_tokens or self.path is None:
            return None
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return None
        if mode & 0o044:
            return (
                f"users file {self.path} holds {self.clear_tokens} token(s) in the clear and its group or others may read it: "
                f"chmod 600 it, or use token_sha256"
            )
        return None

    def authenticate(self, token: object) -> Login | None:
        """The user whose token ``token`` is, as logged in with it, or None.

        Found by the token's SHA-256, as the file stores it: a lookup whose
        timing can tell at most something about that hash, which says
        nothing about any user's token (no one can choose a token by its
        hash), so it needs no constant-time comparison. Every token of every
        user is a key of the same table: which of a user's tokens matched,
        or how many it has, does not change the lookup.
        """
        if not isinstance(token, str):
            return None
        return self.login(hashlib.sha256(token.encode()).digest())

    def login(self, token_hash: bytes) -> Login | None:
        """The user the token of ``token_hash`` names, as logged in with it, or None."""
        return self._logins.get(token_hash)

    def __len__(self) -> int:
        return len(self.by_name)


def _rights(where: str, key: str, value: object) -> Rights:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: {key} must be a list of queue names or patterns")
    for pattern in value:
        if _QUEUE_PATTERN_RE.fullmatch(pattern) is None:
            problem = check_queue(pattern.replace("*", "x")) or "not a queue name or pattern"
            raise ConfigError(f"{where}: {key}: {pattern!r}: {problem}")
    return Rights(tuple(value))


def _user(path: Path, name: str, table: Any) -> User:
    where = f"users file {path}, [users.{name}]"
    if _USER_RE.fullmatch(name) is None:
        raise ConfigError(f"{where}: a user name has 1-64 characters from A-Z a-z 0-9 _ - . @")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(_KEYS))}")
    tokens = _strings(where, "token", table.get("token"))
    digests = _strings(where, "token_sha256", table.get("token_sha256"))
    if not tokens and not digests:
        raise ConfigError(f"{where}: give a token or token_sha256 (a string, or a list of them to have several)")
    for token in tokens:
        if len(token) < 8:
            raise ConfigError(f"{where}: a token must have at least 8 characters")
    for digest in digests:
        if _SHA256_RE.fullmatch(digest) is None:
            raise ConfigError(f"{where}: a token_sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)")
    hashes = [hashlib.sha256(token.encode()).digest() for token in tokens] + [bytes.fromhex(d) for d in digests]
    status = table.get("status", False)
    if not isinstance(status, bool):
        raise ConfigError(f"{where}: status must be true or false")
    publish, subscribe, delete = (_rights(where, key, table.get(key, [])) for key in _LISTS)
    # (A token given twice, in the clear and as its hash, is one token.)
    return User(name, tuple(dict.fromkeys(hashes)), publish, subscribe, delete, status)


def _strings(where: str, key: str, value: object) -> list[str]:
    """A key that takes a string or a list of strings, as a list (absent: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a string or a list of strings")
    return value


def load_users(path: Path) -> Users:
    """Read a users file (see the module's docstring for its format).

    Raises:
        ConfigError: the file cannot be read or parsed, names an unknown key
            or a bad value, has no users, or gives two users one token.
    """
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"users file {path}: {exc}") from None
    unknown = set(doc) - {"users"}
    if unknown:
        raise ConfigError(f"users file {path}: unknown section(s) {sorted(unknown)}; only [users.NAME] is known")
    tables = doc.get("users")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"users file {path}: no users; add a [users.NAME] table with a token")
    users = [_user(path, name, table) for name, table in tables.items()]
    seen: dict[bytes, str] = {}
    for user in users:
        for digest in user.token_hashes:
            other = seen.setdefault(digest, user.name)
            if other != user.name:
                raise ConfigError(
                    f"users file {path}: users {other!r} and {user.name!r} have the same token; a token names one user"
                )
    clear = sum(len(_strings("", "token", table.get("token"))) for table in tables.values())
    return Users(users, path, clear_tokens=clear)
