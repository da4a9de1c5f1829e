"""A stock pjsua2 caller for wire tests: pjsua2 with none of our hooks, as an operator's
other customers run it, so a test sees what such a phone takes from what the proxy
relays.  ``ENDPOINT`` starts a script: one endpoint on the owner thread alone, a UDP
transport on 127.0.0.1 (``transport_id``), no sound device.  ``PRELUDE`` adds, for a
script run as ``python script PROXY_PORT ...``, ``acc`` as alice@example.com with the
proxy at 127.0.0.1:PROXY_PORT as her outbound proxy and her media on 127.0.0.1.  A test
adds its own account or call and what it prints: ``RTP_CALL`` is a ``pj.Call`` that
notes every remote RTP address its stream names (``result["rtp"]``), and a script ends
by printing ``RESULT <json>``, which ``script_result`` reads back; a callee script
first prints ``PORT <its SIP port>`` (``announced_port``)."""

from __future__ import annotations

import json

import subprocess

__all__ = ["ENDPOINT", "PRELUDE", "RTP_CALL", "announced_port", "script_result"]

ENDPOINT = r'''
import json, os, sys, time
import pjsua2 as pj
ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.uaConfig.threadCnt = 0
cfg.uaConfig.mainThreadOnly = True
cfg.logConfig.level = 0
cfg.logConfig.consoleLevel = 0
ep.libInit(cfg)
tcfg = pj.TransportConfig()
tcfg.port = 0
tcfg.boundAddress = "127.0.0.1"
transport_id = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
ep.libStart()
ep.audDevManager().setNullDev()
'''

PRELUDE = ENDPOINT + r'''
acfg = pj.AccountConfig()
acfg.idUri = "sip:alice@example.com"
acfg.sipConfig.transportId = transport_id
acfg.sipConfig.proxies.append("sip:127.0.0.1:%s;lr" % sys.argv[1])
acfg.mediaConfig.transportConfig.port = 0
acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
acc = pj.Account()
acc.create(acfg)
'''

RTP_CALL = r'''
result = {"rtp": []}
class RtpCall(pj.Call):
    def onCallMediaState(self, prm):
        try:
            result["rtp"].append(self.getStreamInfo(0).remoteRtpAddress)
        except Exception as exc:
            result["error"] = repr(exc)
'''


def script_result(stdout: bytes, stderr: bytes = b"") -> dict:
    """What a script printed last as ``RESULT <json>``; AssertionError with the ends of
    its output when it printed none (it died first)."""
    lines = [ln for ln in stdout.decode(errors="replace").splitlines()
             if ln.startswith("RESULT ")]
    assert lines, (stdout[-400:], stderr[-800:])
    return json.loads(lines[-1][len("RESULT "):])


def announced_port(script: subprocess.Popen) -> int:
    """The SIP port a callee script (started with ``stdout=PIPE``) printed as ``PORT n``
    before anything else it says."""
    line = ""
    while not line.startswith("PORT "):
        line = script.stdout.readline().decode()
        assert line, "the stock callee ended before it printed its port"
    return int(line.split()[1])
