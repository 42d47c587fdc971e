"""`--optimize-mix`: gradient steps on h through the coefficient MLP, stopped on held-out text."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from soup_export.errors import MixError
from soup_export.optimize_mix import MixSearchConfig, search_h, split_windows
from soup_train.config import ModelConfig, SoupConfig
from soup_train.model.soup import SoupModel


def sampled_soup_and_texts(h_true: torch.Tensor, n: int = 24, length: int = 24):
    """A soup whose alpha depends strongly on h, and windows sampled from it at h_true."""
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)
    soup = SoupModel(mc, SoupConfig(n_experts=4, coef_hidden=16), len(h_true)).eval()
    with torch.no_grad():
        for p in soup.experts.parameters():
            p.normal_(std=0.3)
        soup.coef.net[-1].weight.normal_(std=3.0)
        x = torch.randint(0, 61, (n, 1))
        for _ in range(length):
            probs = torch.softmax(soup(x, h_true)[:, -1], -1)
            x = torch.cat([x, torch.multinomial(probs, 1)], 1)
    return soup, x.numpy()


def test_search_moves_a_wrong_or_uniform_start_towards_the_texts_mix_and_reports_its_losses():
    h_true = torch.tensor([0.1, 0.7, 0.2])
    soup, windows = sampled_soup_and_texts(h_true)
    start = np.array([1.0, 0.0, 0.0])
    h, report = search_h(soup, windows, start)
    assert report["improved"] and report["held_out_loss_best"] < report["held_out_loss_start"] - 4  # measured 9.285 -> 1.140
    assert np.abs(h - h_true.numpy()).sum() < 0.5 * np.abs(start - h_true.numpy()).sum()
    assert abs(h.sum() - 1.0) < 1e-6 and (h >= 0).all()
    assert report["steps_run"] <= MixSearchConfig().steps
    # from the uniform mix too: measured 12.34 -> 10.77, h = (0.26, 0.48, 0.26) (L1 to h_true 0.45, from 0.73)
    uniform = np.full(3, 1 / 3)
    h2, again = search_h(soup, windows, uniform)
    assert again["improved"] and again["held_out_loss_best"] < again["held_out_loss_start"] - 0.6
    assert h2.argmax() == 1 and np.abs(h2 - h_true.numpy()).sum() < 0.7 * np.abs(uniform - h_true.numpy()).sum()
    # the losses reported are the soup's own on the held-out windows (every fourth), at the start
    # and at the mix returned
    from soup_train.model.llama import lm_loss

    held = torch.as_tensor(windows[3::4])

    def loss(h) -> float:
        with torch.no_grad():
            return float(lm_loss(soup(held[:, :-1], torch.as_tensor(h, dtype=torch.float32)), held[:, 1:]))

    for h0, found, r in ((start, h, report), (uniform, h2, again)):
        assert loss(h0) == pytest.approx(r["held_out_loss_start"], rel=1e-5)
        assert loss(found) == pytest.approx(r["held_out_loss_best"], rel=1e-5)


def test_split_holds_out_every_fourth_window_and_refuses_one_window():
    windows = np.arange(8)[:, None].repeat(5, 1)
    train, held = split_windows(windows, 0.25, 64)
    assert held[:, 0].tolist() == [3, 7] and train[:, 0].tolist() == [0, 1, 2, 4, 5, 6]
    train, held = split_windows(windows[:3], 0.25)
    assert held[:, 0].tolist() == [2] and len(train) == 2
    with pytest.raises(MixError, match="at least 2 windows"):
        split_windows(np.zeros((1, 5), np.int64), 0.25)


def test_windows_of_several_texts_come_from_all_of_them(debug_data):
    """Regression: windows were the first n of the concatenated texts, so a customer whose first file
    was long was represented by that file alone (the mix search then chose its domain only); the
    last file, when short, must not be left out either."""
    from soup_export.evaltext import from_texts
    from soup_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(debug_data / "tokenizer.json")
    first, second = "the cat sat on the mat. " * 200, "import os; print(os.getcwd())\n" * 11
    n_first, n_second = len(tok.encode(first).ids), len(tok.encode(second).ids)
    assert 0.08 < n_second / (n_first + n_second) < 0.12  # the short last file is about a tenth of the text
    windows = from_texts([first, second], debug_data / "tokenizer.json", 8, 16)
    assert windows.shape == (8, 17)
    second_ids = set(tok.encode(second).ids) - set(tok.encode(first).ids)
    from_second = [bool(set(w.tolist()) & second_ids) for w in windows]
    assert from_second == [False] * 7 + [True], from_second  # one window in eight: its share of the tokens
    every = from_texts([first, second], debug_data / "tokenizer.json", 10_000, 16)
    assert len(every) == (n_first + n_second + 2) // 17  # more asked than there are: all of them (an EOS per text)


@pytest.mark.parametrize("rank", [0, 4])
def test_the_streamed_gradient_in_h_is_autograd_through_the_soup(rank):
    """The search holds one dense model, never the soup: its gradient in h (dense backward, then
    <E_j, dL/dTheta> per tensor, then the coefficient MLP) equals autograd through the soup's own
    forward, for full and low-rank experts; its loss is the soup's."""
    from soup_export.optimize_mix import SoupObjective
    from soup_train.model.llama import lm_loss

    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)
    soup = SoupModel(mc, SoupConfig(n_experts=4, coef_hidden=16, expert_rank=rank), 3).eval()
    x = torch.randint(0, 61, (5, 17))
    z = torch.tensor([0.2, -0.1, 0.3], requires_grad=True)
    reference = lm_loss(soup(x[:, :-1], torch.softmax(z, 0)), x[:, 1:])
    reference.backward()
    expected, z.grad = z.grad.clone(), None
    loss = SoupObjective(soup).loss_and_grad(torch.softmax(z, 0), x, batch=2)
    assert loss == pytest.approx(float(reference.detach()), rel=1e-6)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-9)
    assert z.grad.abs().max() > 1e-6  # a gradient that is there to compare
