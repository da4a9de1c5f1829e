"""What a source is counted by (``kamailio_app.sources.site_of``): an IPv4 address as it
is, an IPv6 one by its /56, an address that spells an IPv4 one as that (stop 41;
reviews 124, 125)."""

from __future__ import annotations

import pytest

from kamailio_app.sources import site_of, unmapped


@pytest.mark.parametrize("address,site", [
    ("198.51.100.7", "198.51.100.7"),
    ("2001:db8:0:7::1", "2001:db8::/56"),            # one /64 ...
    ("2001:db8:0:7:ffff::2", "2001:db8::/56"),
    ("2001:db8:0:ff::9", "2001:db8::/56"),           # ... and every other of its /56
    ("2001:db8:0:100::1", "2001:db8:0:100::/56"),     # the next /56 is another site
    ("::ffff:198.51.100.7", "198.51.100.7"),         # IPv4-mapped
    ("2002:c000:221:1::1", "192.0.2.33"),            # 6to4: the IPv4 address it spells
    ("2002:c000:221:ffff::2", "192.0.2.33"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),   # Teredo: its client
    ("not an address", "not an address"),
])
def test_site_of(address, site):
    assert site_of(address) == site


@pytest.mark.parametrize("address,plain", [
    ("::ffff:127.0.0.2", "127.0.0.2"),      # what a dual-stack [::] listener gives (review 128)
    ("127.0.0.2", "127.0.0.2"),
    ("2002:c000:221:1::1", "2002:c000:221:1::1"),   # 6to4 is an IPv6 path: not the host
    ("2001:db8::1", "2001:db8::1"),
    ("not an address", "not an address"),
])
def test_unmapped(address, plain):
    assert unmapped(address) == plain
