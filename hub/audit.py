"""``gpunexus audit``: check a receipt log without trusting the hub that wrote it.

For every entry: the hub's signature over the entry hash, the hash itself, the
chain link to the previous entry, both signatures on the receipt (host and
gateway), the cost against tokens and price, the fee split, and that no
request id is settled twice. Then the balances the log implies (each client's
spending, each host's earnings, the platform's fees) are recomputed and
printed; they must add up to zero. Every fault names its entry and receipt.

An *account extract* (a header naming an ``account``: what a user downloads
from the dashboard, :func:`gpunexus.hub.chain.log_lines`) holds only the
entries that account paid or earned. Each entry is checked the same way; the
chain links are checked between entries whose sequence numbers follow each
other (the entries between two others are someone else's, so the link across
a gap cannot be rechecked: a note says how many gaps), sequence numbers must
increase, and every entry must name the account as its client or its host.

With ``--openings FILE`` (and the audit log ``gpunexus hub receipts export``
writes next to the receipt log, ``RECEIPT_LOG.audits``, or ``--audits``), the
hub's audits are rechecked as well (:func:`check_audits`): each audited
receipt was selected by the revealed secret and its host's root, and each
verdict is what ``verify.audit.audit`` on the reference model gives for the
gateway's opening. The openings file is JSON lines ``{"request_id",
"opening": base64 Opening}`` (``gpunexus hub audits export FILE`` writes the
ones the hub received).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
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
    receipts: dict[str, bytes] = field(default_factory=dict)
    """Receipt bytes by request id, of the entries that checked out."""
    notes: list[str] = field(default_factory=list)
    """What could not be rechecked (not faults): unrevealed secrets, missing openings."""

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
    account = header.get("account")
    if account is not None and not isinstance(account, str):
        report.faults.append("header: account is not a string")
        return report
    prev, seen, host_owner, gateway_owner = chain.GENESIS, {}, {}, {}
    last_seq, gaps = 0, 0
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
        if account is None:
            faults = _check_entry(report.hub_id, entry, data, digest, sig, prev)
            if entry.seq != report.entries:
                faults.append(f"out of sequence: expected entry {report.entries}")
        else:  # an extract: links only across consecutive entries
            gap = entry.seq != last_seq + 1
            gaps += gap
            faults = _check_entry(report.hub_id, entry, data, digest, sig, entry.prev_hash if gap else prev)
            if entry.seq <= last_seq:
                faults.append(f"out of sequence: after entry {last_seq}")
            if account not in (entry.client, entry.host):
                faults.append(f"not an entry of {account}")
            last_seq = max(last_seq, entry.seq)
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
            report.receipts.setdefault(receipt.request_id, entry.receipt)
            report.balances[entry.client] -= entry.cost
            report.balances[entry.host] += entry.host_amount
            report.balances["platform:fee"] += entry.fee
    if header.get("entries") != report.entries:
        report.faults.append(f"header says {header.get('entries')} entries, the file has {report.entries}")
    if account is not None:
        report.notes.append(f"extract of {account}'s entries: chain links checked between consecutive entries "
                            f"({gaps} gap{'s' if gaps != 1 else ''} where other accounts' entries were left out)")
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


def audit_log_path(receipt_log: str) -> str:
    """Where ``gpunexus hub receipts export FILE`` writes the audit log: ``FILE.audits``."""
    return receipt_log + ".audits"


def check_audits(report: AuditReport, audit_log: str, openings: str | None) -> None:
    """Recheck the hub's audits against the receipt log in ``report``; faults and notes go into it.

    ``audit_log`` is the hub's export (:func:`gpunexus.hub.honesty.export_audits`). For every
    verdict: its receipt is in the receipt log; its period is the receipt's; when the period's
    secret is revealed, the secret matches the commitment and the receipt is selected by it
    (``verify.selection.is_selected`` with the host's signed root at the stated rate, or rate 1
    when the host published no root). With ``openings`` (JSON lines ``{"request_id", "opening":
    base64 Opening}``), every ``passed``/``failed``/``skipped`` verdict is recomputed: the opening
    must match the receipt, and ``verify.audit.audit`` on the reference model must give the same
    status and the same reason codes (the text before the first ':'; the numbers in a reason may
    differ in the last digits between machines). A verdict that rests on peer verifiers (its line
    lists ``verifiers``) is noted with their ids, not recomputed: the engine is theirs.
    """
    from gpunexus.protocol.messages import ReceiptRoot
    from gpunexus.verify import selection

    from . import honesty

    def fault(text: str) -> None:
        report.faults.append(text)

    try:
        with open(audit_log, encoding="utf-8") as f:
            lines = [json.loads(x) for x in f.read().splitlines() if x.strip()]
    except (OSError, ValueError) as exc:
        fault(f"audit log {audit_log}: unreadable ({exc})")
        return
    header = lines[0] if lines and isinstance(lines[0], dict) else {}
    if header.get("format") != honesty.AUDIT_LOG_FORMAT or not isinstance(header.get("period_s"), (int, float)):
        fault(f"audit log {audit_log}: not a gpunexus audit log")
        return
    period_s = float(header["period_s"])
    secrets: dict[int, bytes] = {}
    roots: dict[tuple[str, int], bytes] = {}
    verdicts: list[dict] = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            kind = line["kind"]
            if kind == "period":
                secret = bytes.fromhex(line["secret"])
                if not selection.check_reveal(bytes.fromhex(line["commitment"]), secret):
                    fault(f"audit log line {n}: period {line['period']}'s secret does not match its commitment")
                    continue
                secrets[int(line["period"])] = secret
            elif kind == "root":
                msg = decode_as(ReceiptRoot, base64.b64decode(line["root"], validate=True))
                msg.verify()
                if (msg.host_id, msg.period) != (line["host_id"], line["period"]):
                    fault(f"audit log line {n}: root names host {msg.host_id} period {msg.period}")
                    continue
                roots[(msg.host_id, msg.period)] = msg.root
            elif kind == "verdict":
                verdicts.append(line)
        except (KeyError, TypeError, ValueError, binascii.Error, ProtocolError) as exc:
            fault(f"audit log line {n}: unreadable ({exc})")
    opened: dict[str, bytes] = {}
    if openings is not None:
        try:
            with open(openings, encoding="utf-8") as f:
                for n, x in enumerate(f.read().splitlines(), start=1):
                    if not x.strip():
                        continue
                    try:
                        item = json.loads(x)
                        opened[item["request_id"]] = base64.b64decode(item["opening"], validate=True)
                    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
                        fault(f"openings line {n}: unreadable ({exc})")
        except OSError as exc:
            fault(f"openings {openings}: unreadable ({exc})")
    for v in verdicts:
        rid, status = str(v.get("request_id")), v.get("status")
        where = f"audit of receipt {rid}"
        data = report.receipts.get(rid)
        if data is None:
            fault(f"{where}: not a receipt of the receipt log")
            continue
        receipt = decode_as(Receipt, data)
        try:
            period, rate = int(v["period"]), float(v["rate"])
        except (KeyError, TypeError, ValueError):
            fault(f"{where}: period or rate missing")
            continue
        if period != math.floor(receipt.issued_at / period_s) or v.get("host_id") != receipt.host_id:
            fault(f"{where}: period {period} / host are not the receipt's")
        secret = secrets.get(period)
        if secret is None:
            report.notes.append(f"{where}: selection not rechecked (period {period}'s secret is not revealed yet)")
        else:
            root = roots.get((receipt.host_id, period))
            if root is None and rate < 1.0:
                fault(f"{where}: selected at rate {rate} but its host published no root for period {period}")
            elif not (0.0 <= rate <= 1.0) or not selection.is_selected(secret, root or bytes(32), rid, rate):
                fault(f"{where}: not selected by the revealed secret (rate {rate})")
        if status not in ("passed", "failed", "skipped"):
            continue
        judged = v.get("verifiers") if isinstance(v.get("verifiers"), list) else []
        if judged:  # the hub did not replay it: the verdict is the peer verifiers' (hub/peer_audit.py)
            who = ", ".join(f"round {j.get('round')} {j.get('verifier_id')} {j.get('verdict')}"
                            for j in judged if isinstance(j, dict))
            report.notes.append(f"{where}: verdict {status} rests on peer verifiers ({who}); not recomputed here")
            continue
        if openings is None:
            continue
        blob = opened.get(rid)
        if blob is None:
            report.notes.append(f"{where}: verdict {status} not rechecked (no opening)")
            continue
        try:
            opening = honesty.decode_opening(blob)
        except ProtocolError as exc:
            fault(f"{where}: opening unreadable ({exc})")
            continue
        problem = honesty.opening_problem(opening, receipt)
        if problem:
            fault(f"{where}: {problem}")
            continue
        again, verdict = honesty.run_audit(opening, receipt)
        reasons = list(verdict.reasons) if verdict else []
        recorded = v.get("reasons") if isinstance(v.get("reasons"), list) else []
        if again != status or (again != "skipped" and _codes(reasons) != _codes(recorded)):
            fault(f"{where}: recorded {status} {_codes(recorded)}, recomputed {again} {_codes(reasons)}")


def _codes(reasons: list) -> list[str]:
    """The sorted distinct check codes of a verdict's reasons ('seed-replay: ...' -> 'seed-replay')."""
    return sorted({str(r).split(":", 1)[0] for r in reasons})


def run(path: str, hub_id: str | None = None, openings: str | None = None, audits: str | None = None) -> int:
    """CLI body: print the verdict and implied balances; 0 if all holds, else 1.

    With ``openings`` or ``audits``, the hub's audit verdicts and selections are rechecked too
    (:func:`check_audits`; the audit log defaults to the one exported next to the receipt log).
    """
    try:
        report = audit_file(path, hub_id=hub_id)
    except OSError as exc:
        print(f"audit: cannot read {path}: {exc}")
        return 1
    if audits or openings:
        check_audits(report, audits or audit_log_path(path), openings)
    for note in report.notes:
        print(f"note {note}")
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
