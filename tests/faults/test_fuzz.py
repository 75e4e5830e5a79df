"""Fuzzing the two places where text from outside enters a run: the config and label files.

Config: random YAML documents (real keys and junk, values of every YAML type, deep nesting,
huge numbers, NaN, unicode) and random dotted overrides go through ``after-ray config`` in
process. It must answer with exit code 0 (and a YAML that resolves to itself again) or 2 with
one ``after-ray: error:`` message; never a traceback, never a file written.

Labels: random bytes, and CSV / Label Studio JSON files that look valid but carry mutations
(unknown ids, labels outside the class set, duplicates, conflicts, paths escaping the corpus,
NUL bytes, invalid UTF-8, huge lines), go through ``import_labels`` on a real run with a recorded
selection. Either every written label is valid (a class name, for an item selected in the round,
consistent with what was stored), or ``LabelImportError`` is raised and ``labels.jsonl`` is
byte-identical. No other exception is allowed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from after_ray.cli import main
from after_ray.config.sections import Config, load_config
from after_ray.errors import LabelImportError
from after_ray.pipeline import labeling
from after_ray.store.check import check_run_dir
from after_ray.store.layout import LABELS_FILE
from after_ray.store.run_state import RunState, read_labels_file

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# =========================================================================== config


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, key + "."))
    return keys


REAL_KEYS = _dotted_keys(Config().to_dict())
# Sections whose values are free-form (passed to a loader or a strategy as they are).
FREE_FORM = ("corpus.options", "al.strategy_params", "al.cold_start_params")
# Values the real keys accept, so that many documents get past the type checks and reach the
# value rules (and the printing of a resolved config).
REAL_VALUES = [
    "after", "random", "coreset", "after_init", "synth", "iemocap", "merged", "count",
    "fraction", "seconds", "speaker", "loso", "predefined", "human", "simulated", "tiny",
    "wav2vec2", "auto", "four_class", 0, 1, 3, 16, 0.05, 0.2, 0.5, 1.0, 2.0, True, False, None,
]  # fmt: skip

key_parts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="=."),
    min_size=1,
    max_size=8,
)
real_keys = st.sampled_from(REAL_KEYS + [f"{k}.x" for k in FREE_FORM])
config_keys = st.one_of(
    real_keys,
    real_keys,
    real_keys,
    st.sampled_from(REAL_KEYS).map(lambda k: k + ".extra"),
    st.sampled_from(REAL_KEYS).map(lambda k: k[:-1] or "x"),  # a typo
    st.lists(key_parts, min_size=1, max_size=4).map(".".join),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**308, 10**309, -(10**400), 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.dates(),
    st.sampled_from(REAL_VALUES),
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4),
    ),
    max_leaves=12,
)


def _nest(depth: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(depth):
        leaf = {"k": leaf} if as_dict else [leaf]
    return leaf


# Far below the depth where PyYAML itself overflows the stack (~500 levels): deeper documents
# are refused as a whole; see test_yaml_the_parser_refuses_is_a_config_error.
deep_values = st.builds(_nest, st.integers(1, 60), scalars, st.booleans())
any_value = st.one_of(yaml_values, deep_values, st.sampled_from(REAL_VALUES))
# YAML text that no dumped value produces: aliases (cycles, shared subtrees), tags, YAML 1.1
# spellings, numbers beyond float range, escapes of NUL and lone surrogates.
YAML_SNIPPETS = [
    "&a [*a]", "&a {x: *a}", "&a {x: [1, *a]}", ".nan", ".NaN", ".inf", "-.inf", "9" * 400,
    "-" + "9" * 320, "1.0e+400", "0x7fffffffffffffffff", "0o777", "1_000", "1:20", "~", "yes",
    "off", "2020-01-01", "2020-01-01T10:00:00Z", "!!binary aGk=", "!!set {a, b}",
    "!!omap [a: 1, b: 2]", "!!str 12", "!!float 1", "'\x00'", '"\\x00"', '"\\ud800"',
    '"\\U0010FFFF"', "[a, {b: [c, {d: e}]}]", "{}", "[]", "''", "|\n  two\n  lines",
]  # fmt: skip
yaml_snippets = st.sampled_from(YAML_SNIPPETS)


def _put(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


@st.composite
def config_documents(draw) -> bytes:
    kind = draw(st.sampled_from(["tree", "tree", "raw", "raw", "top", "text", "bytes"]))
    if kind == "raw":
        # Hand-written YAML: real (or junk) nested keys with snippet values.
        lines = []
        for key in draw(st.lists(config_keys, min_size=1, max_size=6)):
            parts = key.split(".")
            for depth, part in enumerate(parts):
                value = f" {draw(yaml_snippets)}" if depth == len(parts) - 1 else ""
                lines.append(f"{'  ' * depth}{json.dumps(part)}:{value}")
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "top":
        document: Any = draw(any_value)
    else:
        document = {}
        for key, value in draw(st.lists(st.tuples(config_keys, any_value), max_size=8)):
            _put(document, key, value)
    text = yaml.safe_dump(document, allow_unicode=draw(st.booleans()), sort_keys=False)
    return text.encode("utf-8")


def _inline_yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={_inline_yaml(v)}", config_keys, any_value),
        st.builds(lambda k, raw: f"{k}={raw}", real_keys, yaml_snippets),
        st.builds(lambda k, raw: f"{k}={raw}", real_keys, yaml_snippets),
        st.builds(lambda k, raw: f"{k}={raw}", config_keys, st.text(max_size=20)),
        st.text(max_size=20),  # no '=', empty dotted parts, anything
    ).filter(lambda text: not text.startswith("-")),  # a leading '-' is argparse's, not ours
    max_size=5,
)


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            keys.extend(_leaf_keys(value, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


# One setting set to one edge value: most settings have no rule against NaN, inf or a number
# beyond float range, so this is where a loader that forgets them fails.
EDGE_VALUES = [
    ".nan", ".inf", "-.inf", "9" * 400, "-" + "9" * 320, "1.0e+400", "9" * 30, "-1", "0",
    "&a [*a]", "&a {x: *a}", '"\\ud800"', "2020-01-01", "[]", "{}", "~",
]  # fmt: skip
edge_overrides = st.builds(
    lambda key, value: f"{key}={value}",
    st.sampled_from(_leaf_keys(Config().to_dict()) + [f"{k}.x" for k in FREE_FORM]),
    st.sampled_from(EDGE_VALUES),
)
all_overrides = st.builds(
    lambda edge, other: edge + other, st.lists(edge_overrides, max_size=3), overrides
)


def _files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _run_config_command(workdir: Path, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.chdir(workdir),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = main(["config", *args])
    return code, out.getvalue(), err.getvalue()


def _check_config_outcome(document: bytes, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config_file = workdir / "fuzzed.yaml"
        config_file.write_bytes(document)
        before = _files_under(workdir)
        code, out, err = _run_config_command(workdir, ["--config", str(config_file), *extra])
        assert code in (0, 2), (code, err)
        assert "Traceback" not in err
        assert _files_under(workdir) == before, "the config command wrote files"
        if code == 2:
            assert err.startswith("after-ray: error:"), err
            assert out == ""
            return
        # Accepted: what it prints is a complete config that resolves to itself.
        resolved = workdir / "resolved.yaml"
        resolved.write_text(out, encoding="utf-8")
        again, out_again, err_again = _run_config_command(workdir, ["--config", str(resolved)])
        assert (again, err_again) == (0, ""), err_again
        assert out_again == out
        # ... and no typed setting holds NaN or inf (they slip through every "<" / ">" rule).
        assert _non_finite_settings(load_config(resolved)) == []


def _non_finite_settings(node: Any, prefix: str = "") -> list[str]:
    if dataclasses.is_dataclass(node):
        found = []
        for f in dataclasses.fields(node):
            key = f"{prefix}{f.name}"
            if key not in FREE_FORM:
                found += _non_finite_settings(getattr(node, f.name), key + ".")
        return found
    if isinstance(node, list | tuple):
        return [k for i, v in enumerate(node) for k in _non_finite_settings(v, f"{prefix}{i}.")]
    if isinstance(node, float) and not math.isfinite(node):
        return [prefix.rstrip(".")]
    return []


@FUZZ
@given(document=config_documents(), extra=all_overrides)
@example(document=b"corpus:\n  options: &a {x: *a}\n", extra=[])  # alias cycle (was a crash)
@example(document=b"", extra=["al.budget.initial=" + "9" * 400])  # int beyond float range
@example(document=b"", extra=["al.budget.unit=count", "al.budget.initial=.nan"])
@example(document=b"", extra=["corpus.options.x=&a [*a]"])
def test_config_command_never_crashes(document, extra):
    _check_config_outcome(document, extra)


def _alias_bomb(levels: int = 9) -> bytes:
    lines = ["corpus:", "  options:", "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"    l{i}: &l{i} [{refs}]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("document", "extra", "expected"),
    [
        (b"corpus:\n  options: &a {x: *a}\n", [], "refers to itself"),
        (_alias_bomb(), [], "more than"),  # 10**10 leaves if expanded
        (b"", ["al.budget.initial=" + "9" * 400], "finite number"),
        (b"", ["al.budget.initial=.nan"], "finite number"),
        (b"", ["ray.gpus_per_worker=.inf"], "finite number"),
        (b"", ["run.seed=" + "9" * 30], "64 bits"),
        (b"al:\n  strategy_params: &p {a: [*p]}\n", [], "refers to itself"),
    ],
)
def test_config_inputs_that_crashed_before_are_clear_errors(tmp_path, document, extra, expected):
    config_file = tmp_path / "c.yaml"
    config_file.write_bytes(document)
    code, out, err = _run_config_command(tmp_path, ["--config", str(config_file), *extra])
    assert code == 2 and err.startswith("after-ray: error:") and expected in err, err


@pytest.mark.parametrize(
    ("document", "extra"),
    [
        (b"[" * 10_000 + b"]" * 10_000, []),
        (b"", ["corpus.options.x=" + "[" * 10_000 + "]" * 10_000]),
        (b"run:\n  seed: " + b"9" * 5000 + b"\n", []),
        (b"", ["run.seed=" + "9" * 5000]),
    ],
)
def test_yaml_the_parser_refuses_is_a_config_error(tmp_path, document, extra):
    config_file = tmp_path / "c.yaml"
    config_file.write_bytes(document)
    code, _out, err = _run_config_command(tmp_path, ["--config", str(config_file), *extra])
    assert code == 2 and err.startswith("after-ray: error:"), err


# =========================================================================== labels

CLASSES = ["neutral", "happy", "angry", "sad"]
ROUND0 = ["c/s1/a", "c/s1/b", "c/s2/c"]  # labeled in round 0
ROUND1 = ["c/s2/d", "c/s3/e", "c/s3/f", "c/s4/g"]  # the round being imported
STORED_ROUND1 = {"c/s4/g": "sad"}  # already imported once
UNKNOWN = ["c/s9/z", "", " c/s2/d ", "C/S2/D", "c/s2/d\x00", "c/s2/d\ud800"]


def _make_run(base: Path) -> tuple[RunState, Path]:
    """A run with round 0 labeled, round 1 selected and partly labeled; a corpus next to it."""
    root = base / "corpus"
    for utt_id in ROUND0 + ROUND1:
        wav = root / (utt_id.split("/", 1)[1] + ".wav")
        wav.parent.mkdir(parents=True, exist_ok=True)
        wav.write_bytes(b"RIFF")
    outside = base / "secret.txt"
    outside.write_text("outside the corpus")
    (root / "link_out.wav").symlink_to(outside)
    (root / "loop.wav").symlink_to(root / "loop.wav")
    state = RunState.open(base / "run")
    state.record_selection(0, ROUND0, None, "after_init")
    state.append_labels(
        0, [{"utt_id": u, "label": CLASSES[i], "source": "simulated"} for i, u in enumerate(ROUND0)]
    )
    state.record_selection(1, ROUND1, [0.9, 0.8, 0.7, 0.6], "after")
    state.append_labels(
        1, [{"utt_id": u, "label": lab, "source": "human"} for u, lab in STORED_ROUND1.items()]
    )
    return state, root


GOOD_PATHS = ["", "s2/d.wav", "s3/../s3/e.wav", "s3/" * 200 + "e.wav"]
BAD_PATHS = [
    "corpus/s2/d.wav",  # relative to the run's parent, not the root: resolves outside
    "../../etc/passwd",
    "/etc/passwd",
    "link_out.wav",  # a symlink inside the corpus to a file outside it
    "loop.wav",  # a symlink loop
    "s2/d\x00.wav",
    "s2/\ud800.wav",  # JSON can carry a lone surrogate; CSV bytes cannot
    "x" * 300,  # longer than a file name may be
]
paths = st.one_of(st.sampled_from(GOOD_PATHS), st.sampled_from(BAD_PATHS))
# Most rows name an item of the round, so the later checks (paths, conflicts) are reached.
ids = st.one_of(st.sampled_from(ROUND1), st.sampled_from(ROUND1), st.sampled_from(ROUND0 + UNKNOWN))
label_texts = st.one_of(
    st.sampled_from(CLASSES + [c.upper() for c in CLASSES] + [f" {c} " for c in CLASSES]),
    st.sampled_from(["", "joy", "neutral;happy", "Neutral\n", "ｈａｐｐｙ"]),
    st.text(max_size=6),
)
annotators = st.one_of(st.none(), st.sampled_from(["ann1", "ann2", ""]), st.text(max_size=5))


@st.composite
def csv_files(draw, root_name: str) -> bytes:
    header = draw(
        st.sampled_from(
            [
                ["utt_id", "path", "duration_s", "label"],
                ["utt_id", "label"],
                ["label", "utt_id", "annotator"],
                ["UTT_ID", " Label ", "path"],
                ["utt_id", "path"],  # no label column
                ["utt_id", "label", "label"],
                ["utt_id", "label", "comment"],
            ]
        )
    )
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    buffer = io.StringIO()
    writer = csv.writer(
        buffer, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))
    )
    writer.writerow(header)
    cells = {
        "utt_id": ids,
        "label": label_texts,
        "path": paths,
        "duration_s": st.sampled_from(["", "2.5", "nan", "-1"]),
        "annotator": annotators.map(lambda a: a or ""),
        "comment": st.text(max_size=5),
    }
    for _ in range(draw(st.integers(0, 8))):
        row = [draw(cells.get(h.strip().lower(), st.text(max_size=4))) for h in header]
        if draw(st.integers(0, 9)) == 0:
            row = row[: draw(st.integers(0, len(row)))]  # a short row
        writer.writerow(row)
    data = buffer.getvalue().encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # the BOM spreadsheets write
    return data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def _or_junk(strategy):
    """Mostly the well-formed value, sometimes any JSON value in its place."""
    return st.one_of(strategy, strategy, strategy, strategy, strategy, json_values)


def _deep_json(depth: int, opener: str) -> bytes:
    if opener == "[":
        return ("[" * depth + "1" + "]" * depth).encode()
    return ('{"a":' * depth + "1" + "}" * depth).encode()


def _raw_json_files() -> st.SearchStrategy[bytes]:
    """JSON text that json.dumps of a Python value cannot produce: nesting deeper than the
    parser's recursion limit, integers beyond str->int's digit limit, NaN, escaped surrogates."""
    task = '{"data": {"utt_id": "c/s2/d", "path": %s}, "annotations": [%s]}'
    vote = '{"result": [{"value": {"choices": ["happy"]}}], "completed_by": {"email": %s}}'
    return st.one_of(
        st.builds(
            _deep_json, st.sampled_from([10, 900, 5_000, 100_000]), st.sampled_from(["[", "{"])
        ),
        st.sampled_from(
            [
                ("[" + "9" * 5000 + "]").encode(),
                ('[{"data": {"utt_id": "c/s2/d", "n": ' + "1" * 5000 + "}}]").encode(),
                b'[{"data": {"utt_id": "c/s2/d", "duration_s": NaN}}]',
                (task % ('"s2/\\ud800.wav"', vote % '"a"')).encode(),
                (task % ('"s2/d.wav"', vote % '"\\udc80"')).encode(),
                (task % ('"s2/d\\u0000.wav"', vote % '"b"')).encode(),
            ]
        ),
    )


@st.composite
def label_studio_files(draw, root_name: str) -> bytes:
    tasks = []
    for number in range(draw(st.integers(0, 6))):
        annotations = []
        for _ in range(draw(st.integers(0, 3))):
            choices = draw(_or_junk(st.lists(label_texts, min_size=0, max_size=2)))
            result = draw(
                _or_junk(st.just([{"from_name": "emotion", "value": {"choices": choices}}]))
            )
            annotation = {
                "result": result,
                "was_cancelled": draw(st.booleans()) and draw(st.booleans()),
                "completed_by": draw(_or_junk(st.builds(lambda a: {"email": a}, annotators))),
            }
            annotations.append(draw(_or_junk(st.just(annotation))))
        data = {
            "utt_id": draw(_or_junk(ids)),
            "path": draw(_or_junk(paths)),
            "audio": draw(
                st.sampled_from(["/data/local-files/?d=x.wav", "http://h/x.wav", "../x.wav"])
            ),
        }
        task = {"id": number + 1, "data": draw(_or_junk(st.just(data))), "annotations": annotations}
        tasks.append(draw(_or_junk(st.just(task))))
    document = draw(_or_junk(st.just(tasks)))
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Byte-level damage: inserted NULs / invalid UTF-8 / huge lines / quotes, cuts."""
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "insert", "cut", "truncate"]))
        if kind == "insert":
            payload = draw(
                st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3", b'"', b"\n", b",", b"x" * 200_000])
                | st.binary(max_size=8)
            )
            data = data[:position] + payload + data[position:]
        elif kind == "cut":
            data = data[:position] + data[position + draw(st.integers(1, 20)) :]
        else:
            data = data[:position]
    return data


@st.composite
def label_files(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["csv", "csv", "json", "json", "json", "raw_json", "bytes"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=400))
    elif kind == "raw_json":
        data = draw(_raw_json_files())
        kind = "json"
    elif kind == "csv":
        data = draw(csv_files("corpus"))
    else:
        data = draw(label_studio_files("corpus"))
    if draw(st.integers(0, 2)) == 0:
        data = draw(mutated(data))
    suffix = draw(st.sampled_from([f".{kind}" if kind != "bytes" else ".csv", ".txt", ""]))
    return data, suffix


def _check_import_outcome(data: bytes, suffix: str, use_root: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        state, root = _make_run(base)
        try:
            label_file = base / f"answers{suffix}"
            label_file.write_bytes(data)
            log = state.run_dir / LABELS_FILE
            log_before = log.read_bytes()
            stored_before = state.labels()
            corpus_root = root if use_root else None
            try:
                written = labeling.import_labels(
                    state, 1, label_file, CLASSES, corpus_root=corpus_root
                )
            except LabelImportError as exc:
                assert "nothing was imported" in str(exc) or "nothing to label" in str(exc)
                assert log.read_bytes() == log_before
                assert state.labels() == stored_before
                return
            _check_written(state, written, log, log_before, stored_before)
            # Importing the same file again writes nothing (identical labels are no-ops).
            again = labeling.import_labels(state, 1, label_file, CLASSES, corpus_root=corpus_root)
            assert again == []
        finally:
            state.close()
        # A fresh process sees exactly what was written.
        assert check_run_dir(base / "run") == []
        with RunState.open(base / "run", create=False) as reopened:
            assert reopened.labels().keys() == stored_before.keys() | {e["utt_id"] for e in written}


def _check_written(state, written, log: Path, log_before: bytes, stored_before: dict) -> None:
    log_now = log.read_bytes()
    assert log_now.startswith(log_before), "labels.jsonl was rewritten, not appended to"
    parsed = read_labels_file(log)
    assert parsed.bad_lines == [] and parsed.torn_offset is None
    assert len(parsed.entries) == len(stored_before) + len(written)
    for entry in written:
        assert entry["utt_id"] in ROUND1, entry
        assert entry["utt_id"] not in stored_before, entry
        assert entry["label"] in CLASSES and entry["round"] == 1 and entry["source"] == "human"
        votes = entry["votes"]
        if votes is not None:
            assert len(votes) > 1 and set(votes) <= set(CLASSES)
            assert votes.count(entry["label"]) == max(votes.count(v) for v in votes)
        assert entry["annotator"] is None or isinstance(entry["annotator"], str)
    assert len({e["utt_id"] for e in written}) == len(written)
    labels_now = state.labels()
    for utt_id, entry in stored_before.items():
        assert labels_now[utt_id] == entry  # earlier labels untouched
    assert check_run_dir(state.run_dir) == []


@FUZZ
@given(file=label_files(), use_root=st.booleans())
@example(
    file=(b'[{"data": {"utt_id": "c/s2/d"}, "annotations": [{"result": 5}]}]', ".json"),
    use_root=False,
)
@example(file=(b"[" * 50_000 + b"]" * 50_000, ".json"), use_root=False)
@example(file=(b'[{"data": {"utt_id": "c/s2/d", "path": "a\\u0000b"}}]', ".json"), use_root=True)
@example(file=(b'[{"data": {"utt_id": "c/s2/d", "path": "x\\ud800"}}]', ".json"), use_root=True)
@example(
    file=(
        b'[{"data": {"utt_id": "c/s2/d"}, "annotations": [{"completed_by": {"email": "\\udc80"},'
        b' "result": [{"value": {"choices": ["happy"]}}]}]}]',
        ".json",
    ),
    use_root=False,
)
def test_label_import_is_valid_or_refused_whole(file, use_root):
    data, suffix = file
    _check_import_outcome(data, suffix, use_root)


def test_fuzz_generators_produce_importable_files(tmp_path):
    """The generators' well-formed output does import (so the fuzz reaches the write path)."""
    state, root = _make_run(tmp_path)
    try:
        sheet = tmp_path / "ok.csv"
        sheet.write_text("utt_id,path,label\nc/s2/d,s2/d.wav,Happy\nc/s3/e,s3/e.wav,sad\n")
        written = labeling.import_labels(state, 1, sheet, CLASSES, corpus_root=root)
        assert {e["utt_id"]: e["label"] for e in written} == {"c/s2/d": "happy", "c/s3/e": "sad"}
        tasks = [
            {
                "data": {"utt_id": "c/s3/f", "path": "s3/f.wav"},
                "annotations": [
                    {"result": [{"value": {"choices": [c]}}], "completed_by": {"email": a}}
                    for c, a in (("angry", "x"), ("angry", "y"), ("sad", "z"))
                ],
            }
        ]
        export = tmp_path / "ls.json"
        export.write_text(json.dumps(tasks))
        (entry,) = labeling.import_labels(state, 1, export, CLASSES, corpus_root=root)
        assert entry["label"] == "angry" and entry["votes"] == ["angry", "angry", "sad"]
    finally:
        state.close()


def test_label_file_larger_than_the_limit_is_refused_unread(tmp_path, monkeypatch):
    state, _root = _make_run(tmp_path)
    try:
        monkeypatch.setattr(labeling, "MAX_FILE_BYTES", 1000)
        big = tmp_path / "big.csv"
        big.write_bytes(b"utt_id,label\n" + b"c/s2/d,happy\n" * 200)
        log_before = (state.run_dir / LABELS_FILE).read_bytes()
        with pytest.raises(LabelImportError, match="larger than a label file"):
            labeling.import_labels(state, 1, big, CLASSES)
        assert (state.run_dir / LABELS_FILE).read_bytes() == log_before
    finally:
        state.close()
