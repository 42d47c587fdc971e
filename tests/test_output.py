"""Outputs are all or nothing: staged, committed by rename, and stopped cleanly by SIGTERM."""
from __future__ import annotations

from pathlib import Path

import pytest

from soup_export.bank import Bank
from soup_export.mix import validate



def test_staged_output_keeps_the_output_it_replaces_when_stopped_between_its_renames(tmp_path, monkeypatch):
    """The swap renames the old output aside, then the new one in: a stop between the two (SIGTERM is
    raised as SystemExit) must leave the old output in place, not delete both."""
    from soup_export.output import staged_output

    out = tmp_path / "acme"
    out.mkdir()
    (out / "manifest.json").write_text("shipped")
    real = Path.rename

    def rename(self, target):
        if self.name == ".acme.tmp":  # the stop arrives just before the new output is renamed in
            raise SystemExit(143)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SystemExit):
        with staged_output(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "shipped"
    assert not (tmp_path / ".acme.tmp").exists() and not (tmp_path / ".acme.old").exists()


def test_a_stop_whose_exception_was_lost_still_stops_before_the_output_is_committed(tmp_path, monkeypatch):
    """SIGTERM's exception can be swallowed where it is raised (inside a compiled module's import):
    the recorded request is raised again before the staged output replaces the old one, and
    between the tensors of a bank pass."""
    from soup_export import stopping
    from soup_export.engine import fast
    from soup_export.output import staged_output

    out = tmp_path / "acme"
    out.mkdir()
    (out / "manifest.json").write_text("shipped")
    with pytest.raises(stopping.Stopped) as stopped:
        with staged_output(out, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
            monkeypatch.setattr(stopping, "_requested", 15)  # as if SIGTERM's SystemExit had been lost
    assert stopped.value.code == 143
    assert (out / "manifest.json").read_text() == "shipped"
    assert not (tmp_path / ".acme.tmp").exists() and not (tmp_path / ".acme.old").exists()
    weights = iter([fast.Weight("w", [], lambda m, s: {}, None, True)] * 3)
    with pytest.raises(stopping.Stopped):
        fast._write_weights(weights, [], None, False)
    assert len(list(weights)) == 2  # stopped at the first tensor
    monkeypatch.setattr(stopping, "_requested", None)
    with staged_output(out, force=True) as tmp:  # no stop asked for: committed
        (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"


def test_sigterm_is_recorded_cleared_afterwards_and_turns_a_finished_command_into_143(monkeypatch):
    """The handler records the stop as it raises it (check() raises it again); sigterm_stops raises a
    stop whose exception the body lost, and clears it and restores the old handler at its end, so a
    later export in the process is not stopped; run() exits 143 when main() finished with a stop asked for."""
    import signal
    import sys

    from soup_export import cli, stopping

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stopping.Stopped) as stopped:
        with stopping.sigterm_stops():
            assert signal.getsignal(signal.SIGTERM) is stopping._stop
            with pytest.raises(stopping.Stopped):
                stopping._stop(signal.SIGTERM, None)
            assert stopping.requested() and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            with pytest.raises(stopping.Stopped):
                stopping.check()
            # the body goes on, as when the exception was lost: raised at the end
    assert stopped.value.code == 143
    assert not stopping.requested() and signal.getsignal(signal.SIGTERM) == before
    stopping.check()  # cleared: nothing raised
    with stopping.sigterm_stops():
        pass  # no stop asked for: nothing raised

    def main_that_finishes():
        stopping._requested = signal.SIGTERM  # a SIGTERM whose exception was lost inside the command
        sys.exit(0)

    monkeypatch.setattr(cli, "main", main_that_finishes)
    with pytest.raises(stopping.Stopped) as stopped:
        cli.run()
    assert stopped.value.code == 143 and not stopping.requested()


def test_an_export_stops_between_its_customers(debug_ckpt, tmp_path, monkeypatch):
    """A stop asked for once the bank pass is over is raised before the first customer's checks and
    manifest."""
    from soup_export import build as B
    from soup_export import stopping

    real = B.run_pass

    def pass_then_stop(*args, **kwargs):
        result = real(*args, **kwargs)
        monkeypatch.setattr(stopping, "_requested", 15)
        return result

    monkeypatch.setattr(B, "run_pass", pass_then_stop)
    roots = [tmp_path / "a", tmp_path / "b"]
    bank = Bank.open(debug_ckpt)
    mixes = [validate({bank.info.domains[0]: 1.0}, bank.info.domains, name=n) for n in ("a", "b")]
    with pytest.raises(stopping.Stopped):
        B.export(bank, mixes, roots, B.ExportSpec(quant="fp32", parity=False, keep_hf=False))
    assert (tmp_path / "a" / "onnx" / "model.onnx.data").exists() and not list(tmp_path.rglob("manifest.json"))
