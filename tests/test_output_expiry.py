"""`aifed sites` warns about certificates near expiry: the antenna's own and each hub's."""

from __future__ import annotations

import time

from federation import convert, output
from federation.pb import antenna_pb2, jobs_pb2


def test_expiring_certificates_are_named_and_healthy_ones_are_not():
    now = time.time()
    listing = antenna_pb2.ListSitesResponse(
        cert_expires_at=convert.ts(now + 5 * 86400),
        sites=[antenna_pb2.Site(site="lumi", advert=jobs_pb2.Advert(cert_expires_at=convert.ts(now + 300 * 86400))),
               antenna_pb2.Site(site="leonardo", advert=jobs_pb2.Advert(cert_expires_at=convert.ts(now + 86400))),
               antenna_pb2.Site(site="jupiter")])  # never heard from: nothing to say
    warnings = output.expiry_warnings(listing)
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: the antenna's certificate expires on ")
    assert "hub leonardo's certificate" in warnings[1]
    assert abs(output.site_dict(listing.sites[0])["cert_expires_at"] - (now + 300 * 86400)) < 0.01
    assert not output.expiry_warnings(antenna_pb2.ListSitesResponse())  # an old antenna sends no expiry
