"""Which addresses a webhook may reach: decided without sending anything anywhere (a resolver
the test controls stands in for DNS; nothing here opens a socket)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.netguard import AddressNotAllowed, AddressPolicy, literal_addresses

NOTHING_EXTRA = AddressPolicy()

FORBIDDEN = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "10.1.2.3", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "192.0.0.8", "192.0.2.1", "198.18.0.1",
    "198.51.100.7", "203.0.113.9", "192.88.99.1", "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255",
    "::1", "::", "fe80::1", "fec0::1", "fc00::1", "fd00:ec2::254", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:8.8.8.8",  # mapped: refused whatever it maps
    "::127.0.0.1", "::ffff:0:a00:1",  # IPv4-compatible and IPv4-translated spellings
    "64:ff9b::7f00:1", "64:ff9b:1::a9fe:a9fe",  # NAT64
    "2002:7f00:1::1", "2002:a9fe:a9fe::1",  # 6to4 of loopback and of the metadata address
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_special_addresses_are_refused(address):
    assert not NOTHING_EXTRA.allows(ipaddress.ip_address(address))
    with pytest.raises(AddressNotAllowed):
        NOTHING_EXTRA.check_submitted_host(f"[{address}]" if ":" in address else address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_are_allowed(address):
    assert NOTHING_EXTRA.allows(ipaddress.ip_address(address))
    NOTHING_EXTRA.check_submitted_host(address)


@pytest.mark.parametrize("host", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7f.1", "127.0.0.1.",
                                  "localhost", "LOCALHOST.", "api.localhost", "[::1]", "[::ffff:7f00:1]"])
def test_other_spellings_of_loopback_are_refused_at_submission(host):
    with pytest.raises(AddressNotAllowed):
        NOTHING_EXTRA.check_submitted_host(host)


def test_a_name_is_left_to_the_attempt_and_a_literal_needs_no_lookup():
    assert literal_addresses("hooks.example.com") is None
    NOTHING_EXTRA.check_submitted_host("hooks.example.com")  # may resolve anywhere: checked when sent

    def no_dns(host, port):
        raise AssertionError("a literal address must not be looked up")

    assert NOTHING_EXTRA.resolve("8.8.8.8", 443, no_dns) == [ipaddress.ip_address("8.8.8.8")]
    with pytest.raises(AddressNotAllowed):
        NOTHING_EXTRA.resolve("localhost", 80, no_dns)


def test_every_resolved_address_is_checked():
    answers = {"public.test": ["8.8.8.8", "2606:4700:4700::1111", "8.8.8.8"],
               "mixed.test": ["8.8.8.8", "10.0.0.7"],
               "metadata.test": ["169.254.169.254"],
               "zoned.test": ["fe80::1%eth0"],
               "odd.test": ["not an address"]}

    def resolver(host, port):
        return answers[host]

    assert [str(a) for a in NOTHING_EXTRA.resolve("public.test", 443, resolver)] == ["8.8.8.8", "2606:4700:4700::1111"]
    for host in ("mixed.test", "metadata.test", "zoned.test", "odd.test"):
        with pytest.raises(AddressNotAllowed):
            NOTHING_EXTRA.resolve(host, 443, resolver)


def test_an_empty_answer_is_a_lookup_failure_not_a_pass():
    with pytest.raises(OSError):
        NOTHING_EXTRA.resolve("nothing.test", 80, lambda host, port: [])


def test_the_operator_allows_listed_networks_only():
    policy = AddressPolicy.from_setting(" 10.20.0.0/16, 127.0.0.0/8 ,fd00:1234::/32")
    for allowed in ("10.20.3.4", "127.0.0.1", "fd00:1234::5", "8.8.8.8"):
        assert policy.allows(ipaddress.ip_address(allowed)), allowed
    for refused in ("10.21.0.1", "192.168.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fd00:1235::1"):
        assert not policy.allows(ipaddress.ip_address(refused)), refused
    policy.check_submitted_host("127.0.0.1")
    policy.check_submitted_host("10.20.0.9")


def test_even_the_widest_list_never_allows_unspecified_or_multicast():
    policy = AddressPolicy.from_setting("0.0.0.0/0,::/0")
    assert policy.allows(ipaddress.ip_address("10.0.0.1"))
    for refused in ("0.0.0.0", "::", "224.0.0.1", "ff02::1"):
        assert not policy.allows(ipaddress.ip_address(refused))


def test_settings_refuse_a_malformed_network_and_an_attempt_longer_than_half_the_lease():
    assert Settings(webhook_allowed_networks="").webhook_allowed_networks == ""
    with pytest.raises(ValidationError, match="webhook_allowed_networks"):
        Settings(webhook_allowed_networks="10.0.0.0/33")
    with pytest.raises(ValidationError, match="half of webhook_lease_s"):
        Settings(webhook_timeout_s=40, webhook_lease_s=60)
