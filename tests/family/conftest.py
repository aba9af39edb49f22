"""A tiny family on disk (parent + two whitened-SVD members), built by the real `family build`."""

import pytest

from family import defaults
from plrd.build import BuildConfig, build_family
from plrd.heal import HealConfig


@pytest.fixture(scope="session")
def tiny_family_dir(tiny_parent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-family")
    build_family(
        BuildConfig(parent=tiny_parent_dir, targets=[0.8, 0.6], calib=str(defaults.WIKITEXT_VALID), out=out, name="tiny",
                    heal=HealConfig(tokens=0), method="whitened", calib_sequences=8, calib_seq_len=128, command="test"),
        progress=False,
    )
    return out
