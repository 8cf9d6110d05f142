"""The fleet dashboard: one web page over a running federation (``hyprstream dashboard``).

The page shows what a fleet operator watches: every device with its strategy, battery, online state,
when it was last seen and its privacy budget; every global version over time with its accuracy,
participants and bytes; each layer's vector clock and staleness; the audit log's tail and whether it
verifies. The server holds no credentials for core: the viewer's own core token (from
``hyprstream token create``) travels with each request for data and the dashboard makes core's calls
with it, so core checks it (signature, expiry, revocation, role), audits the reads under the viewer's
identity, and the role decides what the page shows: models, versions and devices for ``reader``,
``fog`` and ``admin``; the audit log for ``auditor`` and ``admin``. Device state comes from the fleets'
MQTT telemetry, through a broker login of the dashboard's own (a read-only user).

The audit log is verified as it grows (:class:`~hyprstream.core.audit.ChainCheck`): each refresh reads the
entries added since the last one and checks their chain and signatures, then the signed head checkpoint,
against core's audit public key when it is given.

Pages are static files (no data in them, no inline script: a Content-Security-Policy of ``'self'`` holds);
everything a device or a fog reported is put into the page as text, never as markup.
"""

from hyprstream.dashboard.server import Dashboard, DashboardServer

__all__ = ["Dashboard", "DashboardServer"]
