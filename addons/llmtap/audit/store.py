"""The SQLite audit store under its former name (``llmtap.audit.sqlite`` and ``llmtap.audit.rows``)."""

from llmtap.audit.rows import RowBuilder, chain_hash, row_builder
from llmtap.audit.sqlite import (
    GENESIS,
    MIGRATIONS,
    PAGE_SIZE,
    AuditStore,
    Batch,
    ChainCheck,
    NotAnAuditLog,
    chain_anchor,
    check_audit_log,
    connect,
    connect_readonly,
    migrate,
    verify_chain,
)

__all__ = [
    "GENESIS",
    "MIGRATIONS",
    "PAGE_SIZE",
    "AuditStore",
    "Batch",
    "ChainCheck",
    "NotAnAuditLog",
    "RowBuilder",
    "chain_anchor",
    "chain_hash",
    "check_audit_log",
    "connect",
    "connect_readonly",
    "migrate",
    "row_builder",
    "verify_chain",
]
