"""Kamailio adapter for the E2M core: ``e2m-proxy`` (launcher), the KEMI script, the
shared key cache on htable, and the services (archive, media record)."""
