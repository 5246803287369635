"""The typed manifests and the config parser, property-tested: whatever a manifest or config holds,
parsing either returns a value that satisfies the format's invariants (and round-trips), or raises
koff's own error naming the file. No other exception, whatever the input."""

import copy
import json

import pytest
import yaml
from conftest import tiny_config_dict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from koff.config.recipe import MemoryConfig, TrainConfig, config_from_dict, read_yaml
from koff.core.errors import ArtifactError, KoffError
from koff.core.fields import from_mapping
from koff.storage.manifests import CellRecord, CheckpointManifest, MemoryManifest, RunManifest
from koff.training.pipeline import decompose

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, llama_folder, data_files):
    """A real koff.json and memory.json (and a metrics-carrying memory.json) from a tiny run."""
    from koff.data.text import Domain
    from koff.training.pipeline import add_domain

    root = tmp_path_factory.mktemp("manifests")
    run = root / "run"
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, run, steps=2))
    cfg.reference = False
    decompose(cfg, progress=False)
    add_domain(run, Domain("xx", train=[data_files["es"]["train"]]), steps=1, progress=False)
    read = lambda p: json.loads(p.read_text())
    return {"run": read(run / "koff.json"), "memory": read(run / "memories" / "en" / "memory.json"),
            "added": read(run / "memories" / "xx" / "memory.json")}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(data, doc):
    """Up to three random edits of a JSON document: replace a value, or delete a key / item."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        else:
            del parent[path[-1]]
    return doc


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_valid_manifests_round_trip(manifests):
    for kind, cls in (("run", RunManifest), ("memory", MemoryManifest), ("added", MemoryManifest)):
        m = cls.from_dict(manifests[kind], kind)
        assert _same(m.to_dict(), manifests[kind]), kind  # what koff wrote is what it reads back
        assert cls.from_dict(m.to_dict(), kind) == m


@SETTINGS
@given(data=st.data())
def test_run_manifest_parser(manifests, data):
    doc = _mutate(data, manifests["run"])
    try:
        m = RunManifest.from_dict(doc, "koff.json")
    except ArtifactError as e:
        assert "koff.json" in str(e)
        event("refused")
        return
    event("accepted")
    assert set(m.files) == m.required_files()
    assert 0 <= m.target_sparsity < 1 and m.base_model.fingerprint.startswith("sha256:")
    assert len(m.base_model.intermediate_sizes) == m.base_model.num_layers
    assert _same(RunManifest.from_dict(m.to_dict(), "again").to_dict(), m.to_dict())


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["memory", "added"]))
def test_memory_manifest_parser(manifests, data, which):
    doc = _mutate(data, manifests[which])
    try:
        m = MemoryManifest.from_dict(doc, "memory.json")
    except ArtifactError as e:
        assert "memory.json" in str(e)
        event("refused")
        return
    event("accepted")
    assert set(m.files) == m.required_files() and m.parts
    assert _same(MemoryManifest.from_dict(m.to_dict(), "again").to_dict(), m.to_dict())


@SETTINGS
@given(state=json_values)
def test_checkpoint_manifest_parser(state):
    doc = {"format": "koff.checkpoint", "format_version": 2, "state": state}
    try:
        m = CheckpointManifest.from_dict(doc, "state.json")
    except ArtifactError as e:
        assert "state.json" in str(e)
        return
    assert _same(m.to_dict(), doc)
    assert all(isinstance(r, str) for r in m.tensor_refs)


def _cell():
    return {"id": "c", "method": "koff", "group": "main", "seed": 0, "kind": "decompose", "setting": {},
            "config": {"train": {}}, "train": {"steps": 1, "seconds": 0.5, "tokens": 32},
            "ppl": {"en": {"backbone": {"test": {"ppl": 12.0, "tokens": 60}}}}, "tasks": {},
            "sparsity": {"ffn": 0.25, "global": 0.1}, "swap": {"memories": ["en"], "domains": ["en"], "test": [[9.0]]}}


@SETTINGS
@given(data=st.data())
def test_cell_record_parser(data):
    doc = _mutate(data, _cell())
    try:
        c = CellRecord.from_dict(doc, "cell.json")
    except ArtifactError as e:
        assert "cell.json" in str(e)
        return
    for row in c.ppl.values():
        assert row["backbone"]["test"]["ppl"] >= 1
    assert _same(CellRecord.from_dict(c.to_dict(), "again").to_dict(), c.to_dict())


@pytest.fixture(scope="module")
def base_config(llama_folder, data_files, tmp_path_factory):
    return tiny_config_dict(llama_folder, data_files, tmp_path_factory.mktemp("cfg") / "out", steps=2)


@SETTINGS
@given(data=st.data())
def test_config_parser(base_config, data, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("KOFF_DATA", str(tmp_path_factory.getbasetemp() / "no-shared-data"))
    raw = _mutate(data, base_config)
    try:
        cfg = config_from_dict(raw, "c.yaml")
    except KoffError as e:
        assert "c.yaml" in str(e)
        event("refused")
        return
    event("accepted")
    cfg.validate()  # what parsed is valid as a whole ...
    assert cfg.train.steps >= 1 and 0 <= cfg.target_sparsity < 1 and all(p.is_absolute() for d in cfg.domains
                                                                          for p in d.train)
    again = config_from_dict({**cfg.to_dict(), "general": [str(p) for p in cfg.general] or "none"}, "again")
    assert again.to_dict() == cfg.to_dict()  # ... and reads back unchanged


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(["steps", "lr_lora", "seed", "controller", "dtype", "warmup_frac",
                                               "grad_accum", "gradient_checkpointing", "lora_rank", "kv_tokens",
                                               "lora_alpha", "lora_targets", "nonsense"]), json_values, max_size=4))
def test_config_sections(values):
    """A section (train or memory) either parses into a valid dataclass or names its field."""
    for cls, name in ((TrainConfig, "train"), (MemoryConfig, "memory")):
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ or k == "nonsense"}
        try:
            section = from_mapping(cls, known, f"c.yaml: {name}")
            section.validate(name)
        except KoffError as e:
            assert name in str(e)
            continue
        assert "nonsense" not in known


@SETTINGS
@given(text=st.text(max_size=80) | st.binary(max_size=40))
def test_yaml_reader(text, tmp_path_factory):
    p = tmp_path_factory.getbasetemp() / "random.yaml"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    try:
        raw = read_yaml(p)
    except KoffError as e:
        assert "random.yaml" in str(e) and "\n" not in str(e)
        return
    assert isinstance(raw, dict)


def test_yaml_errors_name_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"steps": 1}}) + "\ndomains: [en\n")
    with pytest.raises(KoffError, match="line 5, column 1"):
        read_yaml(p)
