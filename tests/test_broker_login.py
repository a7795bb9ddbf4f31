"""A client's broker login is its bearer token: when it would cross a network in
clear, the SDK says so (a broker named by `--broker` or `$CLOUDLET_BROKER`)."""

from __future__ import annotations

import pytest

from mobile_client.discovery import token_in_clear


@pytest.mark.parametrize(("broker", "in_clear"), [
    ("mqtt://127.0.0.1:1883", False),
    ("mqtt://127.8.9.1:1883", False),
    ("mqtt://[::1]:1883", False),
    ("mqtt://localhost:1883", False),
    ("mqtts://broker.example:8883", False),
    ("mqtts://10.0.0.5:8883", False),
    ("mqtt://10.0.0.5:1883", True),
    ("mqtt://broker.example:1883", True),
    ("mqtt://localhost.evil.example:1883", True),
    ("mqtt://[2001:db8::1]:1883", True),
])
def test_a_token_in_clear_is_plain_mqtt_beyond_this_machine(broker: str, in_clear: bool) -> None:
    assert token_in_clear(broker) is in_clear
