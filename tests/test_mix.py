"""Mixes: weights validated and normalised, mix files and customers files parsed with one-line errors."""
from __future__ import annotations

import re

import pytest

from soup_export.errors import MixError
from soup_export.mix import mix_from_mapping, parse_mix, validate

from stages import DOMAINS


def test_mix_is_validated_and_normalisation_is_recorded():
    mix = validate(parse_mix("licences=3, python-code=1"), DOMAINS)
    assert mix.weights == (0.25, 0.75, 0.0) and mix.normalised
    assert not validate({"licences": 1.0}, DOMAINS).normalised
    for text, message in [("legal=1", "unknown domain(s) 'legal'; the checkpoint's domains are python-code"),
                          ("licences=-1", "negative"), ("licences=nan", "not finite"),
                          ("licences=0,python-code=0", "all weights are zero"), ("licences", "not DOMAIN=WEIGHT"),
                          ("licences=abc", "not a number")]:
        with pytest.raises(MixError, match=re.escape(message)):
            validate(parse_mix(text), DOMAINS)
    with pytest.raises(MixError, match="not a number"):
        mix_from_mapping({"mix": {"licences": "lots"}}, DOMAINS, "file:x.yaml")


def test_mix_files_refuse_a_key_given_twice_and_report_parse_errors_on_one_line(tmp_path):
    """YAML and JSON keep the last of two equal keys silently (a customer or a weight dropped); the
    parsers' errors are a line, not a dump of the offending text."""
    from soup_export.mix import read_mix_file

    cases = {"dup.yaml": "customers:\n  a: {licences: 1}\n  a: {python-code: 1}\n",
             "weights.yaml": "{licences: 1, licences: 2}\n",
             "dup.json": '{"customers": {"a": {"licences": 1}, "a": {"python-code": 1}}}',
             "weights.json": '{"licences": 1, "licences": 2}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(MixError, match=r"key '(a|licences)' is given twice in one mapping.*give each key once"):
            read_mix_file(tmp_path / name)
    (tmp_path / "ok.yaml").write_text("customers:\n  a: {licences: 1}\n  b: {licences: 1}\n")
    assert list(read_mix_file(tmp_path / "ok.yaml")["customers"]) == ["a", "b"]
    (tmp_path / "merge.yaml").write_text("base: &base {licences: 1, python-code: 1}\n"
                                         "customers:\n  a: {<<: *base, licences: 3}\n")  # a merged key overridden: legal
    assert read_mix_file(tmp_path / "merge.yaml")["customers"]["a"] == {"licences": 3, "python-code": 1}
    with pytest.raises(MixError, match="domain 'licences' is given twice"):
        parse_mix("licences=1,licences=2")
    with pytest.raises(MixError, match="domain '1' is given twice"):
        mix_from_mapping({1: 1.0, "1": 2.0}, DOMAINS, "file:x.yaml")
    (tmp_path / "bad.yaml").write_text("customers:\n  a: {licences: 1\n  b: [\n")
    with pytest.raises(MixError, match=r"cannot parse mix file .*bad.yaml: .* at line 3, column \d+; fix the file") as err:
        read_mix_file(tmp_path / "bad.yaml")
    assert "\n" not in err.value.message


def test_an_error_in_a_batch_file_names_the_customer(debug_ckpt, tmp_path):
    from soup_export.batchfile import read_batch
    from soup_train.errors import DataError

    for entry, error, message in [("{klingon: 1}", MixError, "unknown domain(s) 'klingon'"),
                                  ("{licences: lots}", MixError, "weight of 'licences' is 'lots', not a number"),
                                  ("{texts: [nowhere]}", DataError, "does not exist")]:
        (tmp_path / "customers.yaml").write_text(f"customers:\n  a: {{licences: 1}}\n  b: {entry}\n")
        with pytest.raises(error, match=re.escape("customers.yaml: customer 'b': ") + ".*" + re.escape(message)):
            read_batch(debug_ckpt, tmp_path / "customers.yaml")
    (tmp_path / "customers.yaml").write_text("customers:\n  1: {licences: 1}\n  '1': {licences: 2}\n")
    with pytest.raises(MixError, match="customer name '1' is given twice"):  # equal once made names
        read_batch(debug_ckpt, tmp_path / "customers.yaml")
