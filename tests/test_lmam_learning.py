"""LMAM learns at the paper's own settings: lr 1e-4 (Tables 17, 19) and the paper's scales s, on a
real pretrained model (stories260K), on a task an attention map can solve (a fixed-lag copy).
scripts/lmam_learning.py is the measurement behind the README's table; these tests rerun it."""
import os
import sys

import pytest

from conftest import ROOT, shared

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from lmam_learning import run   # noqa: E402



@pytest.mark.parametrize("scale", [1 / (4096 * 600), 1 / 255, 1.0], ids=["llama-7b", "roberta", "bart"])
def test_default_init_learns_at_the_papers_lr(scale):
    before, after, size = run("zero", scale, lr=1e-4, steps=300, path=shared("stories260K", "stories260K.bin"))
    assert before - after > 0.5, (before, after)          # the held-out copy loss falls clearly
    assert 0.02 < size < 1.0                             # the map reached the size of attention probabilities


def test_paper_literal_init_does_not_learn_at_llamas_scale():
    """The contrast the default exists for: the literal parametrisation at s = 1/(4096·600)."""
    before, after, size = run("paper", 1 / (4096 * 600), lr=1e-4, steps=300,
                                path=shared("stories260K", "stories260K.bin"))
    assert abs(before - after) < 0.05 and size < 1e-4, (before, after, size)
