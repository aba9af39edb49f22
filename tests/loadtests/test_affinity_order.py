"""The affinity scenario starts its two arms fairly: each arm starts first in half of the sessions."""

from loadtests.affinity_multiturn import start_order


def test_each_arm_starts_first_equally_often_and_every_session_runs_once_per_arm():
    order = start_order(["affinity_on", "affinity_off"], 4)
    assert sorted(order) == sorted((k, arm) for k in range(4) for arm in ("affinity_on", "affinity_off"))
    firsts = [order[i][1] for i in range(0, len(order), 2)]
    assert [order[i][0] for i in range(0, len(order), 2)] == [0, 1, 2, 3]  # interleaved: a session's two arms start together
    assert firsts.count("affinity_on") == firsts.count("affinity_off") == 2
