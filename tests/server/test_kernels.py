"""The matmul kernels the torch engine serves with (server.kernels) and the two forms of its LM head's
product compute what F.linear computes, for every input the decoder hands them, and the engine's
choice between them follows its own timings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.kernels import PACK_BATCH, Linear, onednn_available, runnable_kernels
from server.layout import BATCH1_NOISE, HEADS, MARGIN, choose_head, choose_head_batch1, choose_kernel, head_logits, streamed_matvec, wins

@pytest.mark.parametrize("kernel", runnable_kernels(torch.float32))
def test_a_kernel_computes_the_linear_map_for_the_decoders_inputs(kernel):
    torch.manual_seed(0)
    w, b = torch.randn(48, 40), torch.randn(48)
    wide = torch.randn(2, 5, 100)
    for x in (torch.randn(1, 40), torch.randn(16, 40), torch.randn(3, 1, 40), wide[..., 30:70]):  # the last one is a column slice
        with torch.inference_mode():
            for bias in (None, b):
                torch.testing.assert_close(Linear(w, bias, kernel)(x), F.linear(x, w, bias), atol=1e-4, rtol=1e-4)


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel must be one of"):
        Linear(torch.randn(4, 4), None, "fast")


def test_a_choice_needs_a_clear_gain_under_load_and_no_clear_loss_at_batch_1():
    assert wins({1: 100, PACK_BATCH: 80}, {1: 100, PACK_BATCH: 100})
    assert wins({1: 100 * (1 + BATCH1_NOISE), PACK_BATCH: 50}, {1: 100, PACK_BATCH: 100})  # inside the noise at batch 1
    assert not wins({1: 100 * (1 + BATCH1_NOISE) + 1, PACK_BATCH: 50}, {1: 100, PACK_BATCH: 100})  # clearly slower at batch 1
    assert not wins({1: 50, PACK_BATCH: 95}, {1: 100, PACK_BATCH: 100})  # no clear gain at batch 16
    assert not wins({1: 100, PACK_BATCH: 100}, {1: 100, PACK_BATCH: 100})


def test_the_kernel_chosen_is_the_one_its_timings_favour():
    kernel, times = choose_kernel([(96, 64), (64, 96)], torch.float32)
    assert set(times["aten"]) == {1, PACK_BATCH} and all(t > 0 for t in times["aten"].values())
    assert kernel == ("onednn" if "onednn" in times and wins(times["onednn"], times["aten"]) else "aten")
    assert ("onednn" in times) == onednn_available(torch.float32)


@pytest.mark.parametrize("form", HEADS)
def test_both_forms_of_the_head_give_the_same_logits(form):
    torch.manual_seed(0)
    w = torch.randn(300, 40)
    for h in (torch.randn(1, 40), torch.randn(16, 40), torch.randn(3, 2, 40)):
        out = head_logits(h, w, form)
        assert out.shape == (*h.shape[:-1], 300)
        torch.testing.assert_close(out, F.linear(h, w), atol=1e-4, rtol=1e-4)


def test_the_head_form_chosen_is_the_one_its_timings_favour():
    form, times = choose_head(torch.randn(2000, 64))
    assert form == ("transposed" if wins(times["transposed"], times["linear"]) else "linear")


def test_the_streamed_head_gives_one_rows_logits_and_refuses_more_rows():
    if streamed_matvec() is None:
        pytest.skip("inductor cannot compile here (no C++ compiler)")
    torch.manual_seed(0)
    w = torch.randn(300, 40)
    for h in (torch.randn(1, 40), torch.randn(1, 1, 40)):
        out = head_logits(h, w, "streamed")
        assert out.shape == (*h.shape[:-1], 300)
        torch.testing.assert_close(out, F.linear(h, w), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        head_logits(torch.randn(2, 40), w, "streamed")


def test_the_batch1_head_is_streamed_only_where_its_timings_favour_it():
    form, times = choose_head_batch1(torch.randn(2000, 64), "transposed")
    if streamed_matvec() is None:
        assert (form, times) == ("transposed", {})
    else:
        assert set(times) == {"transposed", "streamed"}
        assert form == ("streamed" if times["streamed"] < (1 - MARGIN) * times["transposed"] else "transposed")
