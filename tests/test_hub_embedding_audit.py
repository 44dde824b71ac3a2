"""The hub audits an embedding receipt like any other: the opening binds to it, the vector is replayed."""

from __future__ import annotations

import dataclasses

import numpy as np
from gpunexus.hub import honesty
from gpunexus.protocol.messages import Opening, OutputHasher, Receipt, Sampling
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.signing import Signer
from gpunexus.verify.embedding import embed
from gpunexus.verify.registry import load_reference

HOST, GATEWAY = Signer(b"\x05" * 32), Signer(b"\x06" * 32)


def opening_and_receipt(vector: bytes) -> tuple[Opening, Receipt]:
    model, tok = load_reference()
    text = "embed me"
    opening = Opening(request_id="ef" * 16, kind="embedding", messages=(), prompt=text, continuation="",
                      sampling=Sampling(1.0, 1.0, 0, (), 11), max_tokens=1, first_draw=0, output_ids=(), output_text="",
                      output_vector=vector)
    hasher = OutputHasher()
    hasher.update_vector(vector)
    tokens_in = len(tok.completion_prompt(text))
    receipt = Receipt(request_id=opening.request_id, host_id=HOST.peer_id, gateway_id=GATEWAY.peer_id, model="tiny",
                      model_hash=model.model_hash, price_micro_per_mtok=200_000, tokens_in=tokens_in, tokens_out=0,
                      cost_micro=cost_micro(tokens_in, 200_000), output_hash=hasher.digest(), prompt_hash=opening.prompt_hash(),
                      seed=11, finish_reason="stop", commitment=b"", issued_at=1.0).signed(HOST, "host_sig")
    return opening, receipt


def test_an_honest_embedding_passes_and_a_wrong_vector_fails():
    model, tok = load_reference()
    host16, _ = load_reference(dtype=np.float16)
    honest = embed(host16, tok.completion_prompt("embed me")).tobytes()
    opening, receipt = opening_and_receipt(honest)
    assert honesty.opening_problem(opening, receipt) == ""
    status, verdict = honesty.run_audit(opening, receipt)
    assert status == "passed", verdict.reasons
    wrong = embed(model, tok.completion_prompt("something else")).tobytes()
    opening, receipt = opening_and_receipt(wrong)
    status, verdict = honesty.run_audit(opening, receipt)
    assert status == "failed" and verdict.codes == {"embedding"}
    # The opening must be the delivered vector: another one does not hash to the receipt.
    assert honesty.opening_problem(dataclasses.replace(opening, output_vector=honest), receipt)
