"""The audit log: an append-only, hash-chained JSONL file of what was done to which model and why.

    AuditLog(path).append(action="package", actor="ci", model="iris", version=3, digest="sha256:…",
                          reason="nightly retrain", evidence={"rows": 150})
    verify_chain(path)      # -> ChainReport; raises AuditChainBroken naming the first bad line

Every decision about a model version — package, deploy, shift, promote, rollback, unload — is one
line; the evidence behind it (latency, error rate, drift figures) travels in `evidence`.
"""

from gateway.audit.log import (
    GENESIS_HASH,
    AuditChainBroken,
    AuditError,
    AuditLog,
    ChainReport,
    canonical_json,
    default_actor,
    default_audit_path,
    record_hash,
    verify_chain,
)

__all__ = [
    "GENESIS_HASH",
    "AuditChainBroken",
    "AuditError",
    "AuditLog",
    "ChainReport",
    "canonical_json",
    "default_actor",
    "default_audit_path",
    "record_hash",
    "verify_chain",
]
