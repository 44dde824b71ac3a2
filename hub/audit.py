"""``gpunexus audit``: check a receipt log without trusting the hub that wrote it.

For every entry: the hub's signature over the entry hash, the hash itself, the
chain link to the previous entry, both signatures on the receipt (host and
gateway), the cost against tokens and price, the fee split, and that no
request id is settled twice. Then the balances the log implies (each client's
spending, each host's earnings, the platform's fees) are recomputed and
printed; they must add up to zero. Every fault names its entry and receipt.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import defaultdict
from dataclasses import dataclass, field

from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Receipt
from gpunexus.protocol.money import cost_micro, micro_to_usd

from . import chain


@dataclass
class AuditReport:
    hub_id: str = ""
    entries: int = 0
    faults: list[str] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def ok(self) -> bool:
        return not self.faults


def audit_file(path: str, *, hub_id: str | None = None) -> AuditReport:
    """Verify the exported log at ``path``; ``hub_id`` pins the expected signer."""
    report = AuditReport()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != chain.FORMAT or not isinstance(header.get("hub_id"), str):
        report.faults.append("header: not a gpunexus receipt log")
        return report
    report.hub_id = header["hub_id"]
    if hub_id and hub_id != report.hub_id:
        report.faults.append(f"header: log signed by {report.hub_id}, expected {hub_id}")
        return report
    prev, seen, host_owner, gateway_owner = chain.GENESIS, {}, {}, {}
    for lineno, line in enumerate(lines[1:], start=2):
        report.entries += 1
        where = f"line {lineno}"
        try:
            rec = json.loads(line)
            data = base64.b64decode(rec["entry"], validate=True)
            digest, sig = bytes.fromhex(rec["hash"]), base64.b64decode(rec["sig"], validate=True)
            entry = chain.LogEntry.decode(data)
        except (ValueError, KeyError, TypeError, binascii.Error, ProtocolError) as exc:
            report.faults.append(f"{where}: unreadable entry ({exc})")
            continue
        where = f"entry {entry.seq}"
        faults = _check_entry(report.hub_id, entry, data, digest, sig, prev)
        if entry.seq != report.entries:
            faults.append(f"out of sequence: expected entry {report.entries}")
        prev = digest
        try:
            receipt = decode_as(Receipt, entry.receipt)
            where += f" (receipt {receipt.request_id})"
            faults += _check_receipt(receipt, entry)
        except ProtocolError as exc:
            report.faults.append(f"{where}: receipt unreadable ({exc})")
            continue
        if receipt.request_id in seen:
            faults.append(f"settled twice (first at entry {seen[receipt.request_id]})")
        seen.setdefault(receipt.request_id, entry.seq)
        for who, table, owner in (("host", host_owner, entry.host), ("gateway", gateway_owner, entry.client)):
            peer = receipt.host_id if who == "host" else receipt.gateway_id
            if table.setdefault(peer, owner) != owner:
                faults.append(f"{who} {peer} billed to {owner}, earlier to {table[peer]}")
        report.faults += [f"{where}: {f}" for f in faults]
        if not faults:
            report.balances[entry.client] -= entry.cost
            report.balances[entry.host] += entry.host_amount
            report.balances["platform:fee"] += entry.fee
    if header.get("entries") != report.entries:
        report.faults.append(f"header says {header.get('entries')} entries, the file has {report.entries}")
    return report


def _check_entry(hub_id: str, entry: chain.LogEntry, data: bytes, digest: bytes, sig: bytes, prev: bytes) -> list[str]:
    faults = []
    if chain.entry_hash(data) != digest:
        faults.append("entry hash does not match its bytes")
    try:
        chain.verify_hash(hub_id, digest, sig)
    except ProtocolError:
        faults.append("hub signature invalid")
    if entry.prev_hash != prev:
        faults.append("hash chain broken: previous hash does not match")
    return faults


def _check_receipt(receipt: Receipt, entry: chain.LogEntry) -> list[str]:
    faults = []
    for sig_field in ("host_sig", "gateway_sig"):
        try:
            receipt.verify(sig_field)
        except ProtocolError:
            faults.append(f"{sig_field.split('_')[0]} signature invalid")
    if receipt.cost_micro != cost_micro(receipt.tokens_in + receipt.tokens_out, receipt.price_micro_per_mtok):
        faults.append("receipt cost does not match tokens at the price")
    if entry.cost != receipt.cost_micro:
        faults.append(f"billed {entry.cost} but the receipt says {receipt.cost_micro}")
    if entry.fee != entry.cost * entry.fee_bps // 10_000 or entry.host_amount + entry.fee != entry.cost:
        faults.append("fee split does not add up")
    return faults


def run(path: str, hub_id: str | None = None) -> int:
    """CLI body: print the verdict and implied balances; 0 if all holds, else 1."""
    try:
        report = audit_file(path, hub_id=hub_id)
    except OSError as exc:
        print(f"audit: cannot read {path}: {exc}")
        return 1
    for fault in report.faults:
        print(f"FAULT {fault}")
    print(f"hub {report.hub_id or '?'}: {report.entries} entries, {len(report.faults)} faults")
    for name in sorted(report.balances):
        print(f"  {name:<28} {micro_to_usd(report.balances[name]):>16} USD")
    total = sum(report.balances.values())
    if total != 0:
        print(f"FAULT implied balances sum to {total}, not zero")
        return 1
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1
