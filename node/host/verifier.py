"""A host as a peer verifier for its own model (``node serve --verify``, on by default).

The hub cannot run most models, so it sends audits of their receipts to
other hosts of the same weights (``hub/peer_audit.py``). :class:`PeerVerifier`
polls the hub for this host's jobs the way the host already polls it for
audit commitments, runs each job's **prefill** on the host's own backend
(``VerifierBackend.prefill``: one forward pass over prompt + delivered output,
no generation) and posts the signed numbers; the hub judges them and pays a
per-job fee. A job is answered once: a result the hub refused is not sent
again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import trio
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import AuditJob, VerifierResult
from gpunexus.verify.peer import PrefillReport

from ..backends.base import Backend, BackendError, VerifierBackend
from ..hub_client import HostHubLink, HubRefused, HubUnavailable

log = logging.getLogger(__name__)

_LOGPROB_FLOOR = -1e4
"""Where an engine reports -inf (a masked token), the wire carries this finite floor."""
_MAX_REASONS = 16


def can_verify(backend: Backend) -> bool:
    """Whether ``backend`` implements the verifier interface (``prefill``)."""
    return callable(getattr(backend, "prefill", None))


def result_for(job: AuditJob, report: PrefillReport, verifier_id: str, now: float) -> VerifierResult:
    """The (unsigned) wire result of ``report``, clamped to what the message admits."""
    logprobs = tuple(max(_LOGPROB_FLOOR, min(0.0, lp)) if math.isfinite(lp) else _LOGPROB_FLOOR for lp in report.logprobs)
    return VerifierResult(job.job_id, job.hub_id, verifier_id, job.model_hash, report.engine, report.prompt_tokens,
                          report.commitment, logprobs,
                          tuple(min(255, max(0, r)) for r in report.ranks), min(255, report.top_k),
                          report.seed_replayed, tuple(r[:1000] for r in report.replay_reasons[:_MAX_REASONS]), now)


class PeerVerifier:
    def __init__(self, link: HostHubLink, backends: Sequence[VerifierBackend], *, poll_s: float = 5.0) -> None:
        self.link, self.poll_s = link, poll_s
        self.backends = {b.info.model_hash: b for b in backends}
        """The engines of this host that verify, by model hash (a host serving several models verifies each)."""
        self.answered: dict[str, dict] = {}
        """The hub's answer per job id, for the jobs this verifier posted (kept for ``node status``)."""

    async def poll_once(self) -> int:
        """Fetch this host's jobs, answer each new one; how many were answered."""
        jobs = await self.link.fetch_jobs(list(self.backends))
        done = 0
        for job in jobs:
            backend = self.backends.get(job.model_hash)
            if job.job_id in self.answered or backend is None:
                continue
            try:
                report = await backend.prefill(job)
            except BackendError as exc:
                log.warning("cannot verify job %s: %s", job.job_id, exc)
                continue
            result = result_for(job, report, self.link.signer.peer_id, self.link.clock()).signed(self.link.signer)
            try:
                self.answered[job.job_id] = await self.link.post_result(result)
            except HubRefused as exc:
                log.warning("hub refused the result of job %s: %s", job.job_id, exc)
                self.answered[job.job_id] = {"refused": exc.message}
            done += 1
        return done

    def status(self) -> dict:
        """Jobs answered, as the hub judged them, and the fees it paid (for ``gpunexus node status``)."""
        answers = list(self.answered.values())
        return {"jobs": len(answers), "passed": sum(a.get("verdict") == "passed" for a in answers),
                "failed": sum(a.get("verdict") == "failed" for a in answers),
                "refused": sum("refused" in a for a in answers),
                "fees_micro": sum(int(a.get("fee_micro") or 0) for a in answers)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.poll_once()
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                log.info("verifier jobs not fetched: %s", exc)
            await trio.sleep(self.poll_s)
