"""The mix choice: candidates scored on held-out windows of the customer's text; the best ships."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from soup_export.choose_mix import MixChoiceConfig, choose_on_windows
from soup_export.cli import main
from soup_export.mix import validate
from test_optimize_mix import sampled_soup_and_texts

DOMAINS = ["a", "b", "c"]
H_TRUE = torch.tensor([0.1, 0.7, 0.2])
NATURAL = np.array([0.3, 0.4, 0.3])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def soup_losses(soup, windows: np.ndarray, h) -> np.ndarray:
    """The reference: the soup's own forward (autograd module, not the streamed objective), per window."""
    from soup_train.model.llama import lm_loss

    x = torch.as_tensor(windows)
    with torch.no_grad():
        return lm_loss(soup(x[:, :-1], torch.as_tensor(h, dtype=torch.float32)), x[:, 1:], per_row=True).double().numpy()


def expected_passes(steps: int) -> range:
    """Passes over the bank of a choice whose longest search ran `steps` steps, however many customers:
    3 candidate kinds; the search's start (unless it is the uniform mix, still held) and its first point
    softmax(log(h0 + floor)); two per step (gradients, then the held-out loss at the new h, which the
    next step's gradient reuses); and the best searched h if a search moved and its model is no longer
    held."""
    return range(3 + 1 + 2 * steps, 3 + 2 + 2 * steps + 1 + 1)


@pytest.fixture(scope="module")
def wrong_estimate():
    """Texts sampled from a soup at h = (0.1, 0.7, 0.2), and an estimate that put everything on `a`:
    much worse than the natural mix (measured: held-out loss 9.3 vs 2.0)."""
    soup, windows = sampled_soup_and_texts(H_TRUE, n=32)
    return soup, windows, validate({"a": 1.0}, DOMAINS, "texts:1 files", "acme")


def test_an_estimate_worse_than_the_generic_model_does_not_ship(wrong_estimate):
    soup, windows, estimate = wrong_estimate
    (mix, report), = choose_on_windows(soup, NATURAL, [estimate], [windows])
    cands = report["candidates"]
    held = windows[3::4]  # every fourth window: seen by no candidate
    for kind, cand in cands.items():
        h = np.array([cand["weights"].get(d, 0.0) for d in DOMAINS])
        h = h / h.sum()
        assert cand["held_out_loss"] == pytest.approx(soup_losses(soup, held, h).mean(), rel=1e-5), kind
        assert cand["held_out_ppl"] == pytest.approx(math.exp(cand["held_out_loss"]), rel=1e-12)
    assert cands["estimate"]["held_out_loss"] > cands["natural"]["held_out_loss"]  # the premise
    assert report["chosen"] != "estimate"
    assert report["chosen"] == min(cands, key=lambda k: cands[k]["held_out_loss"])
    assert cands[report["chosen"]]["held_out_loss"] <= cands["natural"]["held_out_loss"]
    assert np.allclose(mix.h, [cands[report["chosen"]]["weights"].get(d, 0.0) for d in DOMAINS], atol=1e-6)
    assert mix.name == "acme" and mix.source == f"texts:1 files ({report['chosen']})"
    # the gain over the generic model and its standard error, from the reference's per-window losses
    d = soup_losses(soup, held, NATURAL) - soup_losses(soup, held, mix.h)
    g = report["gain_over_generic"]
    assert g["loss"] == pytest.approx(d.mean(), rel=1e-4) and g["loss_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-3)
    assert g["ppl"] == pytest.approx(1 - math.exp(-d.mean()), rel=1e-4) and g["beats_generic"] and report["warning"] is None
    assert cands["search"]["start"] in ("natural", "uniform")  # the best of the three on the fitting windows
    assert report["held_out_windows"] == len(held) and report["fit_windows"] == len(windows) - len(held)


def test_the_estimate_strategy_ships_it_and_warns_when_it_loses(wrong_estimate, caplog):
    soup, windows, estimate = wrong_estimate
    with caplog.at_level(logging.WARNING):
        (mix, report), = choose_on_windows(soup, NATURAL, [estimate], [windows], MixChoiceConfig(strategy="estimate"))
    assert report["chosen"] == "estimate" and mix.h.tolist() == [1.0, 0.0, 0.0]
    assert not report["gain_over_generic"]["beats_generic"] and report["gain_over_generic"]["loss"] < 0
    assert "outside the training domains" in report["warning"] and "outside the training domains" in caplog.text
    assert set(report["candidates"]) == {"estimate", "natural", "uniform"} and report["cost"]["bank_passes"] == 3  # no search
    (mix, report), = choose_on_windows(soup, NATURAL, [estimate], [windows], MixChoiceConfig(strategy="search"))
    assert report["chosen"] == "search" and np.allclose(
        mix.h, [report["candidates"]["search"]["weights"].get(d, 0.0) for d in DOMAINS], atol=1e-6)


def test_customers_chosen_together_share_each_pass_and_choose_as_alone(wrong_estimate):
    """A batch's choice: every candidate kind and every search step is one pass over the bank for all
    the customers; each customer's figures are those of its choice alone."""
    soup, windows, estimate = wrong_estimate
    other_soup_windows = sampled_soup_and_texts(torch.tensor([0.6, 0.1, 0.3]), n=24)[1]
    other = validate({"b": 1.0, "c": 1.0}, DOMAINS, "texts:2 files", "globex")
    together = choose_on_windows(soup, NATURAL, [estimate, other], [windows, other_soup_windows])
    alone = [choose_on_windows(soup, NATURAL, [e], [w])[0] for e, w in ((estimate, windows), (other, other_soup_windows))]
    for (mix, report), (mix1, report1) in zip(together, alone):
        assert report["chosen"] == report1["chosen"] and np.allclose(mix.h, mix1.h, atol=1e-6)
        for kind in report["candidates"]:
            assert report["candidates"][kind]["held_out_loss"] == pytest.approx(
                report1["candidates"][kind]["held_out_loss"], rel=1e-5)
    steps = max(r["candidates"]["search"]["steps_run"] for _, r in together)
    passes = together[0][1]["cost"]["bank_passes"]
    assert passes in expected_passes(steps) and together[1][1]["cost"]["bank_passes"] == passes
    assert passes < sum(r["cost"]["bank_passes"] for _, r in alone)


@pytest.fixture(scope="module")
def licence_texts(debug_data, tmp_path_factory):
    texts = tmp_path_factory.mktemp("licence-texts")
    docs = [json.loads(line)["text"] for line in (debug_data / "corpus/test/licences.jsonl").read_text().splitlines()]
    for i, doc in enumerate(docs[:20]):
        (texts / f"{i}.txt").write_text(doc)
    return texts


def inspect_without_torch(export, expected: str) -> None:
    """`inspect` shows the choice from the manifest alone, in a fresh process that imports no torch."""
    from procs import inspect_in_fresh_process

    printed, imported = inspect_in_fresh_process(export)
    assert expected in printed and "torch" not in imported, (printed, imported)


def test_build_records_the_candidates_and_ships_the_best(debug_ckpt, licence_texts, tmp_path):
    """The manifest's candidate table; the shipped and generic held-out losses recomputed from the
    HF models in transformers (a reference independent of the soup code)."""
    from transformers import AutoModelForCausalLM

    from soup_export.bank import Bank
    from soup_export.evaltext import from_texts
    from soup_export.resolve import resolve_batch
    from soup_train.textfiles import read_texts

    out = tmp_path / "out"
    r = run("build", debug_ckpt, "--from-texts", licence_texts, "--out", out, "--quant", "fp32", "--no-parity")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    c = m["mix_choice"]
    assert set(c["candidates"]) == {"estimate", "natural", "uniform", "search"} and c["config"]["strategy"] == "best"
    losses = {k: v["held_out_loss"] for k, v in c["candidates"].items()}
    assert c["chosen"] == min(losses, key=losses.get) and losses[c["chosen"]] <= losses["natural"]
    assert m["mix"]["weights"] == pytest.approx({d: c["candidates"][c["chosen"]]["weights"].get(d, 0.0)
                                                 for d in m["mix"]["weights"]}, abs=1e-6)
    assert c["gain_over_generic"]["loss"] == pytest.approx(losses["natural"] - losses[c["chosen"]], abs=1e-9)
    assert c["cost"]["bank_passes"] >= 6 and "mix choice (held-out ppl" in r.output and f"-> {c['chosen']}" in r.output
    few = c["held_out_windows"] < 4  # the summary says when the choice rests on a few windows only
    assert ("note: the choice rests on" in r.output) == few, (c["held_out_windows"], r.output)
    bank = Bank.open(debug_ckpt)
    resolve_batch(debug_ckpt, [validate(dict(zip(bank.info.domains, bank.info.natural)), bank.info.domains)],
                  [tmp_path / "natural"])
    windows = from_texts(read_texts([licence_texts]), bank.tokenizer, c["config"]["windows"],
                         min(c["config"]["window"], bank.info.run.data.seq_len))
    held = torch.as_tensor(windows[3::4])
    assert len(held) == c["held_out_windows"]
    for hf, recorded in ((tmp_path / "natural", losses["natural"]), (out / "hf", losses[c["chosen"]])):
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(hf).eval()(held[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held[:, 1:].flatten())
        assert float(loss) == pytest.approx(recorded, rel=1e-5), hf
    inspect_without_torch(out, f"-> {c['chosen']}; gain over generic")
    # --mix-strategy estimate ships Algorithm 3's histogram, as `estimate` prints it
    r = run("build", debug_ckpt, "--from-texts", licence_texts, "--mix-strategy", "estimate", "--out", tmp_path / "est",
            "--quant", "fp32", "--no-parity", "--no-hf")
    assert r.exit_code == 0, r.output
    est = json.loads(run("estimate", debug_ckpt, licence_texts, "--json").output)
    assert json.loads((tmp_path / "est" / "manifest.json").read_text())["mix"]["weights"] == pytest.approx(est, abs=1e-6)


def test_explicit_weights_are_shipped_as_given_and_compared(debug_ckpt, licence_texts, tmp_path):
    r = run("build", debug_ckpt, "--mix", "licences=0.7,python-code=0.3", "--eval-texts", licence_texts,
            "--out", tmp_path / "o", "--quant", "fp32", "--no-parity", "--no-hf")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["mix"]["weights"] == {"python-code": 0.3, "licences": 0.7, "python-docs": 0.0}
    assert m["mix"]["source"] == "weights"
    c = m["mix_choice"]
    assert c["chosen"] == "given" and set(c["candidates"]) == {"given", "natural"} and c["fit_windows"] == 0
    assert c["candidates"]["given"]["weights"] == {"licences": 0.7, "python-code": 0.3}
    # without --eval-texts: no comparison, no choice
    r = run("build", debug_ckpt, "--mix", "licences=1", "--out", tmp_path / "o2", "--quant", "fp32", "--no-parity", "--no-hf")
    assert r.exit_code == 0 and "mix_choice" not in json.loads((tmp_path / "o2" / "manifest.json").read_text())
    for args in (["--mix", "licences=1", "--mix-strategy", "search"], ["--mix", "licences=1", "--optimize-mix", licence_texts]):
        r = run("build", debug_ckpt, *args, "--out", tmp_path / "o3")
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception  # no traceback
        assert "explicit weights" in r.output and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o3").exists()


def test_batch_chooses_its_text_customers_together(debug_ckpt, debug_data, licence_texts, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    docs = [json.loads(line)["text"] for line in (debug_data / "corpus/test/python-code.jsonl").read_text().splitlines()]
    for i, doc in enumerate(docs[:12]):
        (code / f"{i}.py").write_text(doc)
    (tmp_path / "c.yaml").write_text(f"customers:\n  acme: {{licences: 1}}\n  lic: {{texts: [{licence_texts}]}}\n"
                                     "  code: {texts: [code]}\n")
    r = run("batch", debug_ckpt, tmp_path / "c.yaml", "--out", tmp_path / "b", "--quant", "fp32", "--no-parity", "--no-hf")
    assert r.exit_code == 0, r.output
    got = {n: json.loads((tmp_path / "b" / n / "manifest.json").read_text()) for n in ("acme", "lic", "code")}
    assert "mix_choice" not in got["acme"]
    lic, cod = got["lic"]["mix_choice"], got["code"]["mix_choice"]
    assert lic["cost"]["customers"] == cod["cost"]["customers"] == 2
    assert lic["cost"]["bank_passes"] == cod["cost"]["bank_passes"]  # one count: the passes were shared
    steps = max(c["candidates"]["search"]["steps_run"] for c in (lic, cod))
    assert lic["cost"]["bank_passes"] in expected_passes(steps)
    summary = json.loads((tmp_path / "b" / "batch.json").read_text())["customers"]
    assert [c.get("mix_choice", {}).get("chosen") for c in summary] == [None, lic["chosen"], cod["chosen"]]
    assert r.output.count("mix choice (held-out ppl") == 2


def test_too_little_text_ships_the_estimate_with_a_warning_and_the_search_refuses_it(debug_ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    r = run("build", debug_ckpt, "--from-texts", short, "--out", tmp_path / "o", "--quant", "fp32", "--no-parity", "--no-hf")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["mix_choice"]["chosen"] == "estimate" and "fewer than 2 windows" in m["mix_choice"]["skipped"]
    assert "mix choice: fewer than 2 windows" in r.output
    est = json.loads(run("estimate", debug_ckpt, short, "--json").output)
    assert m["mix"]["weights"] == pytest.approx(est, abs=1e-6)
    for args in (["--from-texts", short, "--mix-strategy", "search"], ["--optimize-mix", short]):
        r = run("build", debug_ckpt, *args, "--out", tmp_path / "o2")
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
        assert "the mix search needs at least 2 windows" in r.output and len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "o2").exists()


def test_compare_shows_the_gain_on_the_customers_own_text(debug_ckpt, debug_data, licence_texts, tmp_path):
    r = run("build", debug_ckpt, "--from-texts", licence_texts, "--out", tmp_path / "o", "--quant", "fp32",
            "--no-parity", "--no-hf")
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "o" / "manifest.json").read_text())["mix_choice"]["gain_over_generic"]
    r = run("compare", tmp_path / "o", "--ckpt", debug_ckpt, "--data", debug_data, "--windows", "4")
    assert r.exit_code == 0, r.output
    assert "gain on own text (held-out) |" in r.output and f"{100 * g['ppl']:+.1f}% ± {100 * g['ppl_se']:.1f}%" in r.output


def test_a_search_that_does_not_move_is_its_start_and_does_not_win_the_tie(wrong_estimate):
    """Regression: the search's result, equal to its start, was scored again from a fresh instantiation;
    the two measurements of one model differed in the sixth digit, and a batch shipped "search" for
    the estimate's mix. A search that did not move now takes its start's scores, so the tie is exact
    and goes to the earlier candidate (here the start)."""
    from soup_export.optimize_mix import MixSearchConfig

    soup, windows, estimate = wrong_estimate
    cfg = MixChoiceConfig(search=MixSearchConfig(steps=0, max_windows=16))
    (mix, report), = choose_on_windows(soup, NATURAL, [estimate], [windows], cfg)
    search = report["candidates"]["search"]
    assert not search["improved"] and search["held_out_loss"] == report["candidates"][search["start"]]["held_out_loss"]
    assert report["chosen"] == search["start"]
    # 3 candidate kinds and the start's losses (none if it is the uniform mix, still held): nothing scored twice
    assert report["cost"]["bank_passes"] == 3 + (search["start"] != "uniform")
