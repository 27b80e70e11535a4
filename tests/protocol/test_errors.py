"""The exception tree: refusals our own checks find are the broker's classes too."""

from __future__ import annotations

import pytest

from protocol import (
    BadRequest,
    ErrorCode,
    InvalidName,
    LocalProtocolError,
    PayloadTooLarge,
    Publish,
    ServerError,
    Subscribe,
)
from protocol.errors import local_error


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (ErrorCode.INVALID_NAME, InvalidName),
        (ErrorCode.BAD_REQUEST, BadRequest),
        (ErrorCode.PAYLOAD_TOO_LARGE, PayloadTooLarge),
    ],
)
def test_a_local_refusal_is_the_brokers_class_and_a_local_protocol_error(code: ErrorCode, cls: type) -> None:
    local = local_error(code, "why")
    remote = ServerError.for_code(int(code), "why")
    assert isinstance(local, cls) and isinstance(local, ServerError)
    assert type(remote) is cls and not isinstance(remote, LocalProtocolError)  # the registry stays the broker's
    assert (local.code, local.message, local.retriable, local.fatal) == (code, "why", False, False)
    assert str(local) == "why"
    with pytest.raises(cls):
        raise local


def test_other_codes_stay_plain_local_protocol_errors() -> None:
    for code in (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNEXPECTED_FRAME):
        error = local_error(code, "why")
        assert type(error) is LocalProtocolError and error.code is code
        assert not isinstance(error, ServerError)


def test_field_checks_raise_the_classes_the_broker_would() -> None:
    with pytest.raises(InvalidName, match="invalid queue name"):
        Publish(1, "bad name", "E")
    with pytest.raises(BadRequest, match="prefetch must be at least 1"):
        Subscribe(1, 1, "Q", (), None, "new", None, 0)
    with pytest.raises(LocalProtocolError) as shape:  # a wrong type: a caller bug, no broker class
        Publish(1, "Q", 5)  # type: ignore[arg-type]
    assert shape.value.code is ErrorCode.MALFORMED_FRAME and not isinstance(shape.value, ServerError)
