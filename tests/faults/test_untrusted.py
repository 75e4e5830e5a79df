"""Files a run reads that someone else may have written are never executed.

- A model directory with only a pickle (``pytorch_model.bin``), or whose config or shard index
  names one, is a ConfigError saying how to convert it; the pickle's payload (a ``__reduce__``
  that creates a marker file) never runs. The conversion command it prints works.
- A classifier directory with pickles instead of safetensors is a RunStateError.
- A TAPT state file with such a pickle is refused by ``torch.load(weights_only=True)``, as a
  RunStateError naming the file.
- ``trust_remote_code`` is never on: a checkpoint whose config.json points at a custom module
  (``auto_map``) does not import it.
- Paths in a returned label file that escape the corpus root (``..``, absolute paths, symlinks to
  the outside, symlink loops, NUL bytes) are refused with the run state unchanged.
- A guard over the package source: no unpickling, no ``torch.load`` without
  ``weights_only=True``, no ``np.load(allow_pickle=True)``, no ``trust_remote_code`` other than
  ``False``, no ``eval``/``exec``/unsafe YAML.
"""

from __future__ import annotations

import ast
import json
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from after_ray.errors import ConfigError, LabelImportError, RunStateError
from after_ray.pipeline.labeling import import_labels
from after_ray.store.layout import LABELS_FILE
from after_ray.store.run_state import RunState

PACKAGE = Path(__file__).resolve().parents[2] / "after_ray"


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious_pickle(path: Path, marker: Path, *, torch_format: bool) -> None:
    payload = {"weight": _Payload(marker)}
    if torch_format:
        import torch

        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    assert not marker.exists()  # writing it did not run it


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone, save_backbone

    out = tmp_path_factory.mktemp("backbone") / "tiny"
    save_backbone(load_backbone(BackboneConfig(name_or_path="tiny"), for_pretraining=False), out)
    return out


def _pickle_only_copy(src: Path, dst: Path, marker: Path, torch_format: bool) -> Path:
    shutil.copytree(src, dst)
    for weights in dst.glob("*.safetensors"):
        weights.unlink()
    _write_malicious_pickle(dst / "pytorch_model.bin", marker, torch_format=torch_format)
    return dst


# --------------------------------------------------------------------------- model weights


@pytest.mark.parametrize("torch_format", [False, True], ids=["pickle", "torch_save"])
def test_backbone_with_only_a_pickle_is_refused_without_running_it(
    tiny_backbone_dir, tmp_path, torch_format
):
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    marker = tmp_path / "PWNED"
    model_dir = _pickle_only_copy(tiny_backbone_dir, tmp_path / "m", marker, torch_format)
    for for_pretraining in (False, True):
        with pytest.raises(ConfigError, match="safetensors"):
            load_backbone(
                BackboneConfig(name_or_path=str(model_dir)), for_pretraining=for_pretraining
            )
    assert not marker.exists(), "the pickle in pytorch_model.bin was executed"


def test_backbone_with_only_a_pickle_is_a_config_error(tiny_backbone_dir, tmp_path):
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    model_dir = _pickle_only_copy(tiny_backbone_dir, tmp_path / "m", tmp_path / "PWNED", True)
    with pytest.raises(ConfigError, match="safetensors") as info:
        load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=False)
    message = str(info.value)
    # What (a pickle, never unpickled), where (the directory and file) and how to fix it.
    assert "backbone.name_or_path" in message and str(model_dir) in message, message
    assert "pytorch_model.bin" in message and "never unpickles" in message, message
    assert "convert it to safetensors" in message and "python -c" in message, message


def _conversion_command(message: str) -> list[str]:
    line = next(x.strip() for x in message.splitlines() if x.strip().startswith("python -c"))
    argv = shlex.split(line)
    return [sys.executable, *argv[1:]]


def test_the_suggested_conversion_makes_a_trusted_pickle_loadable(tmp_path):
    """The command in the error message, run as printed, gives the same model in safetensors."""
    import torch
    from safetensors.torch import load_file

    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone, save_backbone

    original = load_backbone(BackboneConfig(name_or_path="tiny", seed=3), for_pretraining=True)
    # A quote and a space in the path: the command must survive the shell.
    model_dir = save_backbone(original, tmp_path / "it's a model")
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(weights, model_dir / "pytorch_model.bin")  # a benign, trusted pickle

    with pytest.raises(ConfigError) as info:
        load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=True)
    result = subprocess.run(
        _conversion_command(str(info.value)), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "model.safetensors").is_file()

    converted = load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=True)
    expected, got = original.state_dict(), converted.state_dict()
    assert list(got) == list(expected)  # the quantizer too: the conversion kept every head
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_pickle_named_by_the_config_or_a_shard_index_is_refused(tiny_backbone_dir, tmp_path):
    """transformers loads what config.json (transformers_weights) or a safetensors index names,
    whatever use_safetensors says: a pickle smuggled in that way is refused too."""
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    marker = tmp_path / "PWNED"
    named = tmp_path / "named"
    shutil.copytree(tiny_backbone_dir, named)
    config = json.loads((named / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"  # transformers lets this name through
    (named / "config.json").write_text(json.dumps(config))
    _write_malicious_pickle(named / "adapter_model.bin", marker, torch_format=True)

    indexed = tmp_path / "indexed"
    shutil.copytree(tiny_backbone_dir, indexed)
    (indexed / "model.safetensors").rename(indexed / "model-00001-of-00002.safetensors")
    _write_malicious_pickle(indexed / "model-00002-of-00002.bin", marker, torch_format=True)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.bin"}
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for model_dir, culprit in ((named, "adapter_model.bin"), (indexed, "00002-of-00002.bin")):
        with pytest.raises(ConfigError, match="not safetensors") as info:
            load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=False)
        assert culprit in str(info.value) and str(model_dir) in str(info.value)
    assert not marker.exists(), "a pickle named by the checkpoint was executed"


def test_backbone_directory_without_weights_is_a_config_error(tiny_backbone_dir, tmp_path):
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_backbone_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights") as info:
        load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=False)
    assert str(model_dir) in str(info.value)


@pytest.mark.parametrize("backbone_pickled", [False, True], ids=["head_pickled", "all_pickled"])
def test_classifier_with_pickle_weights_is_refused_without_running_it(
    tiny_backbone_dir, tmp_path, backbone_pickled
):
    from after_ray.models.classifier_io import load_classifier

    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "classifier"
    model_dir.mkdir()
    if backbone_pickled:
        _pickle_only_copy(tiny_backbone_dir, model_dir / "backbone", marker, True)
    else:
        shutil.copytree(tiny_backbone_dir, model_dir / "backbone")
    (model_dir / "classifier.json").write_text(
        json.dumps(
            {
                "class_names": ["a", "b"],
                "n_classes": 2,
                "finetune": {"pooling": "mean", "head_dropout": 0.1, "proj_size": 16},
            }
        )
    )
    # The head's weights as a pickle where classifier.safetensors belongs.
    _write_malicious_pickle(model_dir / "pytorch_model.bin", marker, torch_format=True)
    _write_malicious_pickle(model_dir / "classifier.pt", marker, torch_format=False)
    with pytest.raises(RunStateError) as info:
        load_classifier(model_dir)
    assert not marker.exists(), "a pickle of the classifier directory was executed"
    message = str(info.value)
    assert str(model_dir) in message and "Delete that directory" in message, message
    assert ("backbone" if backbone_pickled else "classifier.safetensors is missing") in message


def test_tapt_state_with_a_malicious_pickle_is_refused(tmp_path):
    # The real format loads (so the refusal below is about the payload, not the file).
    import torch

    from after_ray.store.torch_state import load_training_state, save_training_state

    good = save_training_state({"step": 3, "model": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert load_training_state(good)["step"] == 3

    marker = tmp_path / "PWNED"
    for torch_format in (True, False):
        bad = tmp_path / f"tapt_state_{torch_format}.pt"
        _write_malicious_pickle(bad, marker, torch_format=torch_format)
        with pytest.raises(RunStateError, match="other than tensors") as info:
            load_training_state(bad)
        assert not marker.exists(), "load_training_state executed the pickle"
        message = str(info.value)
        assert str(bad) in message and "delete the checkpoint directory" in message, message
        assert "weights_only=False" not in message  # never advise running the pickle


# --------------------------------------------------------------------------- remote code


def _remote_code_dir(base: Path, marker: Path, config: dict) -> Path:
    model_dir = base / "remote"
    model_dir.mkdir()
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    for module in ("evil_config", "evil_model"):
        (model_dir / f"{module}.py").write_text(code)
    config["auto_map"] = {
        "AutoConfig": "evil_config.EvilConfig",
        "AutoModel": "evil_model.EvilModel",
        "AutoModelForPreTraining": "evil_model.EvilModel",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_checkpoint_needing_custom_code_is_refused_without_importing_it(tmp_path):
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    marker = tmp_path / "PWNED"
    model_dir = _remote_code_dir(tmp_path, marker, {"model_type": "evil"})
    for for_pretraining in (False, True):
        with pytest.raises(ConfigError, match="custom code"):
            load_backbone(
                BackboneConfig(name_or_path=str(model_dir)), for_pretraining=for_pretraining
            )
    assert not marker.exists(), "the checkpoint's custom module was imported"


def test_auto_map_in_a_known_family_checkpoint_is_ignored(tiny_backbone_dir, tmp_path):
    from after_ray.config.backbone import BackboneConfig
    from after_ray.models.backbones import load_backbone

    marker = tmp_path / "PWNED"
    config = json.loads((tiny_backbone_dir / "config.json").read_text())
    model_dir = _remote_code_dir(tmp_path, marker, config)
    shutil.copy(tiny_backbone_dir / "model.safetensors", model_dir)
    model = load_backbone(BackboneConfig(name_or_path=str(model_dir)), for_pretraining=False)
    assert type(model).__module__.startswith("transformers.models.wav2vec2")
    assert not marker.exists(), "the checkpoint's custom module was imported"


# --------------------------------------------------------------------------- label file paths

IDS = ["c/s1/a", "c/s1/b"]
CLASSES = ["neutral", "happy"]


@pytest.fixture
def labeling_run(tmp_path):
    root = tmp_path / "corpus"
    (root / "s1").mkdir(parents=True)
    for name in ("a", "b"):
        (root / "s1" / f"{name}.wav").write_bytes(b"RIFF")
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"not yours")
    (root / "s1" / "escape.wav").symlink_to(secret)
    (root / "s1" / "dir_link").symlink_to(tmp_path, target_is_directory=True)
    (root / "s1" / "loop.wav").symlink_to(root / "s1" / "loop.wav")
    with RunState.open(tmp_path / "run") as state:
        state.record_selection(0, IDS, None, "random")
        yield state, root


ESCAPING = [
    "../../etc/passwd",
    "s1/../../secret.wav",
    "/etc/passwd",
    "s1/escape.wav",  # a symlink inside the corpus pointing outside
    "s1/dir_link/secret.wav",  # through a symlinked directory
    "s1/loop.wav",  # a symlink loop
]


def _import(state, root, tmp_path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return import_labels(state, 0, path, CLASSES, corpus_root=root)


@pytest.mark.parametrize("bad_path", ESCAPING)
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_label_paths_escaping_the_corpus_are_refused(labeling_run, tmp_path, bad_path, fmt):
    state, root = labeling_run
    # Relative paths are taken relative to the corpus root.
    if fmt == "csv":
        content = f"utt_id,path,label\nc/s1/a,s1/a.wav,happy\nc/s1/b,{bad_path},neutral\n"
    else:
        tasks = [
            {
                "data": {"utt_id": u, "path": p},
                "annotations": [{"result": [{"value": {"choices": [lab]}}]}],
            }
            for u, p, lab in (("c/s1/a", "s1/a.wav", "happy"), ("c/s1/b", bad_path, "neutral"))
        ]
        content = json.dumps(tasks)
    with pytest.raises(LabelImportError) as info:
        _import(state, root, tmp_path, f"answers.{fmt}", content)
    message = str(info.value)
    assert repr(bad_path) in message and "nothing was imported" in message, message
    assert state.labels() == {}
    assert not (state.run_dir / LABELS_FILE).exists()


@pytest.mark.parametrize("bad_path", ["s1/a\x00.wav", "s1/\ud800.wav"])
def test_label_paths_with_nul_or_invalid_unicode_are_refused(labeling_run, tmp_path, bad_path):
    state, root = labeling_run
    tasks = [{"data": {"utt_id": "c/s1/a", "path": bad_path}, "annotations": []}]
    with pytest.raises(LabelImportError, match="NUL byte or invalid Unicode"):
        _import(state, root, tmp_path, "answers.json", json.dumps(tasks))
    assert state.labels() == {}


def test_label_paths_inside_the_corpus_are_accepted(labeling_run, tmp_path):
    """The control: the same files with paths inside the root import fine."""
    state, root = labeling_run
    content = (
        f"utt_id,path,label\nc/s1/a,s1/../s1/a.wav,happy\nc/s1/b,{root / 's1' / 'b.wav'},neutral\n"
    )
    written = _import(state, root, tmp_path, "answers.csv", content)
    assert {e["utt_id"]: e["label"] for e in written} == {"c/s1/a": "happy", "c/s1/b": "neutral"}


# --------------------------------------------------------------------------- source guard

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loading(source: str) -> list[str]:
    """Every place in ``source`` that could execute code from a file, as "line N: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.split(".")[0] in UNPICKLERS:
                    found.append(f"{where}: imports {module}")
            if isinstance(node, ast.ImportFrom) and node.module in {"torch", "numpy", "yaml"}:
                loaders = {a.name for a in node.names} & {"load", "unsafe_load", "full_load"}
                if loaders:
                    found.append(f"{where}: imports {node.module}.{sorted(loaders)[0]} by name")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        base, _, attr = name.rpartition(".")
        if base.split(".")[0] in UNPICKLERS:
            found.append(f"{where}: {name}()")
        if name in {"eval", "exec", "builtins.eval", "builtins.exec"}:
            found.append(f"{where}: {name}()")
        if attr in {"read_pickle", "Unpickler"} or name in {
            "torch.jit.load",
            "yaml.unsafe_load",
            "yaml.full_load",
        }:
            found.append(f"{where}: {name}()")
        if name == "torch.load" and not _is_constant(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load() without weights_only=True")
        if name in {"np.load", "numpy.load"} and not (
            _keyword(node, "allow_pickle") is None
            or _is_constant(_keyword(node, "allow_pickle"), False)
        ):
            found.append(f"{where}: {name}() with allow_pickle")
        if name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not _dotted(loader).endswith(("SafeLoader", "CSafeLoader")):
                found.append(f"{where}: yaml.load() without SafeLoader")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not _is_constant(remote, False):
            found.append(f"{where}: trust_remote_code is not False")
        if any(k.arg is None for k in node.keywords) and attr == "from_pretrained":
            found.append(f"{where}: from_pretrained(**kwargs) could turn trust_remote_code on")
    return found


def test_package_source_never_loads_code_from_files():
    findings = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40  # the scan really covers the package
    for path in files:
        for finding in unsafe_loading(path.read_text(encoding="utf-8")):
            findings.append(f"{path.relative_to(PACKAGE.parent)} {finding}")
    assert findings == []


@pytest.mark.parametrize(
    ("snippet", "flagged"),
    [
        ("import pickle\npickle.load(open('x', 'rb'))", True),
        ("from pickle import loads", True),
        ("import cloudpickle as cp\ncp.loads(b'')", True),
        ("torch.load(path)", True),
        ("torch.load(path, weights_only=False)", True),
        ("torch.load(path, map_location='cpu', weights_only=flag)", True),
        ("torch.load(\n    path,\n    weights_only=True,\n)", False),
        ("np.load(f, allow_pickle=True)", True),
        ("numpy.load(f, allow_pickle=flag)", True),
        ("np.load(f, allow_pickle=False)", False),
        ("np.load(f, mmap_mode='r')", False),
        ("AutoConfig.from_pretrained(p, trust_remote_code=True)", True),
        ("AutoModel.from_pretrained(p, trust_remote_code=cfg.trust)", True),
        ("AutoConfig.from_pretrained(p, trust_remote_code=False)", False),
        ("Model.from_pretrained(p, **options)", True),
        ("yaml.load(text)", True),
        ("yaml.load(text, Loader=yaml.SafeLoader)", False),
        ("yaml.safe_load(text)", False),
        ("eval(expression)", True),
        ("pd.read_pickle(path)", True),
        ("torch.jit.load(path)", True),
        ("from torch import load", True),
        ("json.loads(text)", False),
    ],
)
def test_the_source_guard_flags_what_it_should(snippet, flagged):
    assert bool(unsafe_loading(snippet)) is flagged, unsafe_loading(snippet)
