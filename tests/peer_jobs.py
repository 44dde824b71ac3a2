"""Audit jobs as the hub would send them, from real generations (for the peer-verifier tests)."""

from __future__ import annotations

import dataclasses
import time

from gpunexus.protocol.messages import AuditJob, Opening, Sampling
from gpunexus.protocol.signing import Signer
from gpunexus.verify.attacks import HostOutput, honest
from gpunexus.verify.model import ReferenceModel
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams


def job_from(output: HostOutput, prompt: str, sampling: Sampling, max_tokens: int, *, hub: Signer, verifier: str,
             model_hash: str | None = None, **changes) -> AuditJob:
    """The signed job for ``output`` (what a host produced for completion ``prompt``)."""
    _, tokenizer = load_reference("tiny")
    text = tokenizer.decode(list(output.output_ids))
    opening = Opening("ab" * 16, "completion", (), prompt, "", sampling, max_tokens, 0, output.output_ids, text)
    now = time.time()
    job = AuditJob("cd" * 16, hub.peer_id, verifier, 1, "tiny", model_hash or load_reference("tiny")[0].model_hash,
                   opening, output.tokens_in, output.tokens_out, output.finish_reason, output.commitment, now, now + 60)
    return dataclasses.replace(job, **changes).signed(hub)


def generate_job(model: ReferenceModel, prompt: str, *, seed: int = 1, temperature: float = 1.0, max_tokens: int = 40,
                 hub: Signer, verifier: str, **changes) -> AuditJob:
    """``model`` answers ``prompt`` honestly (by its own weights); the job claims the tiny model did."""
    _, tokenizer = load_reference("tiny")
    sampling = Sampling(temperature, 1.0, 0, (), seed)
    params = SamplingParams.from_sampling(sampling, max_tokens, seed)
    output = honest(model, tokenizer, tokenizer.completion_prompt(prompt), params)
    return job_from(output, prompt, sampling, max_tokens, hub=hub, verifier=verifier, **changes)
