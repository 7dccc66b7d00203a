"""The published shapes the report sets ours beside: the nearest evaluation length and its ratio."""

import pytest

from posenc import papers


def test_nearest_picks_the_closest_multiple_of_either_training_length():
    two = papers.nearest("rope", 2)  # 1012 / 512 ties with 2024 / 1024: the shorter training length
    assert two["length"] == 1012 and two["L"] == 512 and two["ratio"] == pytest.approx(21.37 / 20.07)
    eight = papers.nearest("rope", 8)  # 8024 / 1024 = 7.84 is nearer than 4512 / 512 = 8.81
    assert eight["length"] == 8024 and eight["ratio"] == pytest.approx(64.91 / 19.33)
    assert "Table 3" in eight["source"] and "trained at 1024" in eight["source"]
    assert papers.nearest("sinusoidal", 2)["ratio"] == pytest.approx(43.54 / 20.05)


def test_a_scheme_the_paper_did_not_train_has_no_shape():
    assert papers.nearest("learned", 2) is None and papers.nearest("none", 4) is None


def test_every_table_starts_at_its_training_length_and_has_a_value_per_length():
    for L, table in papers.WALL.items():
        assert table["lengths"][0] == L
        assert all(len(ppl) == len(table["lengths"]) for ppl in table["ppl"].values())


def test_t5_row_skips_the_lengths_where_it_ran_out_of_memory():
    assert papers.nearest("t5", 2)["ratio"] == pytest.approx(18.79 / 19.65)  # 1012 / 512
    longest = papers.nearest("t5", 32)  # 15512 / 512 and 16024 / 1024 are out of memory: 8512 / 512 is the nearest
    assert longest["length"] == 8512 and longest["ratio"] == pytest.approx(43.08 / 19.65)
