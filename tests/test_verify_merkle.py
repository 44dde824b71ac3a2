import hashlib

from gpunexus.verify.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    merkle_root,
    node_hash,
    prove,
    receipt_leaf,
    verify_proof,
)
from gpunexus.verify.selection import (
    check_reveal,
    is_selected,
    new_secret,
    secret_commitment,
    select,
)
from hypothesis import given, settings
from hypothesis import strategies as st

leaves_st = st.lists(st.binary(max_size=40), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(leaves=leaves_st, data=st.data())
def test_every_leaf_proves_and_nothing_else_does(leaves: list[bytes], data) -> None:
    root = merkle_root(leaves)
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = prove(leaves, i)
    assert verify_proof(root, leaves[i], i, n, proof)
    assert len(proof) <= max(1, (n - 1).bit_length())
    # Wrong data, index, count, or a tampered proof fail.
    assert not verify_proof(root, leaves[i] + b"x", i, n, proof)
    j = data.draw(st.integers(0, n - 1))
    if verify_proof(root, leaves[i], j, n, proof):
        assert leaves[j] == leaves[i]
    assert not verify_proof(root, leaves[i], i, n + 1, proof)
    assert not verify_proof(root, leaves[i], i, max(1, n - 1), proof) or n == 1
    if proof:
        bad = list(proof)
        bad[0] = hashlib.sha256(bad[0]).digest()
        assert not verify_proof(root, leaves[i], i, n, bad)
        assert not verify_proof(root, leaves[i], i, n, proof[:-1])
    assert not verify_proof(root, leaves[i], i, n, proof + [root])


def test_structure_and_odd_rule() -> None:
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([]) == EMPTY_ROOT
    top = lambda n, h: hashlib.sha256(b"\x02" + n.to_bytes(8, "big") + h).digest()
    assert merkle_root([a]) == top(1, leaf_hash(a))
    ab = node_hash(leaf_hash(a), leaf_hash(b))
    assert merkle_root([a, b, c]) == top(3, node_hash(ab, leaf_hash(c)))  # c carried up unchanged
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])
    # A leaf cannot pose as an inner node.
    assert merkle_root([leaf_hash(a) + leaf_hash(b)]) != merkle_root([a, b])
    assert len(receipt_leaf("0" * 32, b"receipt")) == 64


def test_selection_is_committed_checkable_and_proportional() -> None:
    secret = new_secret()
    commitment = secret_commitment(secret)
    assert check_reveal(commitment, secret) and not check_reveal(commitment, new_secret())
    root = merkle_root([b"r%d" % i for i in range(10)])
    ids = [f"{i:032x}" for i in range(4000)]
    chosen = select(secret, root, ids, 0.1)
    assert 300 < len(chosen) < 500
    assert all(is_selected(secret, root, r, 0.1) for r in chosen)
    # A higher rate selects a superset; another root a different set.
    assert set(chosen) <= set(select(secret, root, ids, 0.5))
    assert set(select(secret, merkle_root([b"other"]), ids, 0.1)) != set(chosen)
    assert select(secret, root, ids, 0.0) == [] and len(select(secret, root, ids, 1.0)) == len(ids)
