"""The 'did you mean' hint every unknown-name error carries."""

import pytest

from efficientgpt.errors import _edit_distance, closest


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("lora", "lora", 0), ("lora", "lroa", 1), ("ICRL", "ICLR", 1),
                                     ("ICRL", "ICML", 1), ("kitten", "sitting", 3), ("", "abc", 3), ("ab", "ba", 1)])
def test_edit_distance_counts_adjacent_swaps_as_one_edit(a, b, d):
    assert _edit_distance(a, b) == d == _edit_distance(b, a)


def test_closest_prefers_the_choice_with_the_same_letters_and_ignores_case():
    venues = ["NeurIPS", "ICML", "ICLR"]
    assert closest("ICRL", venues) == " (did you mean 'ICLR'?)"      # ICML is as near by edits
    assert closest("neurlps", venues) == " (did you mean 'NeurIPS'?)"  # the seed's spelling
    assert closest("sparsgpt", ["wanda", "sparsegpt"]) == " (did you mean 'sparsegpt'?)"


def test_closest_says_nothing_for_a_far_off_name():
    assert closest("xyz", ["lora", "ia3"]) == ""
    assert closest("lora", []) == ""
