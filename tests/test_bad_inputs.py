"""Issue 31, inputs, data and conversion: each bad input is refused or counted before or while it happens,
with a message naming the value, the sample or the file, and the fix (docs/reliability.md lists the cases)."""

from __future__ import annotations

import pickle

import pytest
import torch

from lmms_prune.models.wrappers import InternVLPrune_d2pruner
from lmms_prune.toy.models import tiny_model_dir


def _no_weights(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when an input is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------------------
# Bad 3, Poor 3 and 4: corrupt bias priors


class _Payload:
    """An object a pickle can name but a weights-only load refuses."""


@pytest.mark.parametrize(("means", "shown"), [
    ({16: -torch.ones(16)}, r"means\[16\]: the smallest value is -1.0: values must be > 0"),
    ({16: torch.zeros(16)}, r"means\[16\]: every value is 0: the debiased scores would equal raw attention"),
    ({16: torch.ones(4, 4)}, r"means\[16\]: shape \(4, 4\): must be a non-empty 1-D vector"),
    ({16: torch.ones(0)}, r"means\[16\]: shape \(0,\): must be a non-empty 1-D vector"),
    ({16: torch.ones(16, dtype=torch.int64)}, r"means\[16\]: dtype torch.int64: the values must be floating"),
    ({16: [1.0] * 16}, r"means\[16\]: a list, not a tensor"),
    ({16: torch.full((16,), float("nan"))}, r"means\[16\]: 16 of 16 values are NaN or infinite"),
    ({16: torch.ones(8)}, r"means\[16\]: 8 values for 16 visual tokens"),
    ({}, r"means is empty"),
    ([torch.ones(16)], r"means is a list"),
])
def test_corrupt_prior_is_refused_before_the_weights_load_naming_file_value_and_fix(monkeypatch, tmp_path, means,
                                                                                     shown):
    _no_weights(monkeypatch)
    path = tmp_path / "bad.pt"
    torch.save({"format": 1, "means": means, "counts": {16: 3}, "meta": {}}, path)
    with pytest.raises(ValueError, match=r"bias_prior='.*bad.pt'") as caught:
        InternVLPrune_d2pruner(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu",
                               bias_prior=str(path), on_error="skip")
    message = str(caught.value)
    assert caught.match(shown) and "lmms-prune calibrate" in message


def test_trend_weights_and_priors_share_one_validator(tmp_path):
    """The same vector is refused by both readers with the same reason."""
    import numpy as np

    from lmms_prune.engine.prior import load_prior
    from lmms_prune.scores import load_trend_weights

    for values, reason in [(-np.ones(4), "the smallest"), (np.zeros(4), "every"), (np.ones((2, 2)), "shape (2, 2)"),
                           (np.array([1.0, np.nan, 1.0, 1.0]), "1 of 4")]:
        np.save(tmp_path / "w.npy", values)
        torch.save({"format": 1, "means": {4: torch.from_numpy(values)}}, tmp_path / "p.pt")
        for read in (lambda: load_trend_weights(tmp_path / "w.npy"), lambda: load_prior(tmp_path / "p.pt")):
            with pytest.raises(ValueError) as caught:
                read()
            assert reason in str(caught.value)


def test_a_pickled_prior_is_refused_without_unpickling_and_without_torchs_unsafe_advice(tmp_path):
    from lmms_prune.engine.prior import load_prior

    path = tmp_path / "pickled.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "means": _Payload()}, handle)
    torch.save({"format": 1, "means": {4: torch.ones(4)}, "extra": _Payload()}, tmp_path / "object.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "object.pt").read_bytes()[:200])
    for name in ("pickled.pt", "object.pt", "cut.pt"):
        with pytest.raises(ValueError, match=rf"bias_prior='.*{name}': not a readable prior file") as caught:
            load_prior(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "lmms-prune calibrate" in str(caught.value)
