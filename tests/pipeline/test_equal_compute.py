"""Equal compute: a rival's whole cycles nearest to the backward passes + weighted HVPs its BiSSL arm measured."""

from bissl.pipeline.study import matched_cycles


def test_matched_cycles_round_to_whole_cycles_and_weigh_hvps():
    spent = {"backward": 116, "hvp": 52}
    assert matched_cycles(spent, per_cycle=40, hvp_passes=1.0) == 4  # 168 / 40 = 4.2
    assert matched_cycles(spent, per_cycle=40, hvp_passes=3.4) == 7  # (116 + 176.8) / 40 = 7.3
    assert matched_cycles({"backward": 1, "hvp": 0}, per_cycle=40, hvp_passes=1.0) == 1  # at least one cycle
