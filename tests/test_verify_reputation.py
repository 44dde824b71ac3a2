import random

from gpunexus.verify.reputation import Reputation, ReputationModel, audit_rate, excluded


def test_honest_host_recovers_from_a_rare_false_flag() -> None:
    fresh = Reputation()
    flagged = fresh.record(False)
    assert flagged.p_honest < 0.1 and not excluded(flagged)
    assert audit_rate(flagged) > 5 * audit_rate(fresh)  # suspects are audited far more
    r = flagged
    for _ in range(30):
        r = r.record(True)
    assert r.p_honest > 0.95 and audit_rate(r) < audit_rate(fresh)
    # A long record absorbs a false flag with barely a dent.
    veteran = Reputation(passes=300)
    assert veteran.record(False).p_honest > 0.99 and not excluded(veteran.record(False))


def test_cheats_are_excluded() -> None:
    assert excluded(Reputation().record(False).record(False))
    rng = random.Random(1)
    for cheat_rate in (1.0, 0.3, 0.1):
        r, audits = Reputation(), 0
        while not excluded(r):
            r = r.record(rng.random() >= cheat_rate)
            audits += 1
        assert audits < 40 / cheat_rate


def test_honest_hosts_are_rarely_excluded_at_the_measured_rate() -> None:
    rng = random.Random(2)
    model = ReputationModel(fpr=0.003)
    wrongly = 0
    for _ in range(300):
        r = Reputation(model=model)
        for _ in range(200):
            r = r.record(rng.random() >= 0.001)  # the true rate is below the bound
            if excluded(r):
                wrongly += 1
                break
    assert wrongly <= 1
