"""Remake the two probe envelopes of ``.ci/openssl-probe`` with this project's own code.

Run from the repository root with the venv: ``.venv/bin/python .ci/openssl-probe.d/make.py``.
Both are AuthEnvelopedData AES-128-GCM over content.txt for one kekri (kek.hex,
kek-id.hex): the KEK is a throwaway made for the probe, so no certificate or private
key is needed and `openssl cms -decrypt -secretkey` opens them on a machine that has
nothing else yet.  with-unauthattrs.der carries a CEKReference in unauthAttrs [2]
(RFC 5083); without-attrs.der is the control with no attributes.
"""

from __future__ import annotations

from pathlib import Path

from e2m_plugins.cms import SharedKEK, cek_reference_attributes, seal

HERE = Path(__file__).resolve().parent


def main() -> None:
    kek = SharedKEK(bytes.fromhex((HERE / "kek-id.hex").read_text().strip()),
                    bytes.fromhex((HERE / "kek.hex").read_text().strip()))
    content = (HERE / "content.txt").read_bytes()
    # ``seal(cek_reference=...)`` now puts the reference in authAttrs [1]; the probe keeps
    # it in unauthAttrs [2], the field it was made to test, so it is passed explicitly.
    with_attrs = seal(content, [kek], cipher="aes-128-gcm",
                      extra_attributes=tuple(cek_reference_attributes(b"openssl-probe")))
    (HERE / "with-unauthattrs.der").write_bytes(with_attrs.der)
    (HERE / "without-attrs.der").write_bytes(seal(content, [kek], cipher="aes-128-gcm").der)


if __name__ == "__main__":
    main()
