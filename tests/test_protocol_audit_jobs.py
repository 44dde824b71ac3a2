"""AuditJob (hub-signed) and VerifierResult (verifier-signed): round trips, signatures, bad values."""

from __future__ import annotations

import dataclasses

import pytest

from gpunexus.protocol.codec import decode, decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import AuditJob, VerifierResult
from gpunexus.protocol.signing import Signer
from gpunexus.verify.registry import load_reference
from peer_jobs import generate_job

HUB, VERIFIER = Signer.generate(), Signer.generate()


def _result(**changes) -> VerifierResult:
    fields = dict(job_id="cd" * 16, hub_id=HUB.peer_id, verifier_id=VERIFIER.peer_id, model_hash="h" * 64,
                  engine="reference-float32", prompt_tokens=12, commitment=b"TL", logprobs=(-0.5, -1.25),
                  ranks=(0, 255), top_k=20, seed_replayed=True, replay_reasons=(), issued_at=1.0)
    fields.update(changes)
    return VerifierResult(**fields)


def test_a_job_round_trips_and_its_hub_signature_covers_everything():
    job = generate_job(load_reference("tiny")[0], "Hello", hub=HUB, verifier=VERIFIER.peer_id)
    again = decode_as(AuditJob, job.encode())
    assert again == job
    again.verify()
    forged = dataclasses.replace(again, opening=dataclasses.replace(again.opening, output_ids=(65, 66)))
    with pytest.raises(ProtocolError):
        forged.verify()
    with pytest.raises(ValueError):  # nobody signs under the hub's name
        dataclasses.replace(job, sig=b"").signed(VERIFIER)
    with pytest.raises(ProtocolError):  # a signature by another key does not verify
        dataclasses.replace(job, sig=dataclasses.replace(job, hub_id=VERIFIER.peer_id).signed(VERIFIER).sig).verify()


def test_a_result_is_signed_by_its_verifier_and_values_are_checked():
    result = _result().signed(VERIFIER)
    assert decode(result.encode()) == result
    decode_as(VerifierResult, result.encode()).verify()
    with pytest.raises(ProtocolError):
        dataclasses.replace(result, prompt_tokens=13).verify()
    for bad in ({"ranks": (0,)}, {"logprobs": (0.5, -1.0)}, {"ranks": (0, 256)}, {"engine": ""}, {"job_id": "x"},
                {"logprobs": (float("-inf"), -1.0)}):
        with pytest.raises(ProtocolError):
            decode_as(VerifierResult, _result(**bad).signed(VERIFIER).encode())
