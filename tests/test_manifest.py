import json

import pytest

from edge_embed.errors import BundleError, InvalidInputError
from edge_embed.manifest import Manifest, Parity, Variant
from edge_embed.platform import cgroup_cpu_limit


def _manifest(**changes) -> Manifest:
    fields = dict(
        model_id="m", revision=None, architecture="qwen3", pooling="last_token",
        padding_side="left", append_eos=False, eos_token_id=2, pad_token_id=2, max_length=128,
        dim=1024, matryoshka_min_dim=32, instruction_template="Instruct: {instruction}\nQuery:{text}",
        default_instruction="task", graph_inputs=("input_ids", "attention_mask", "position_ids"),
        variants={"int8": Variant(
            precision="int8", file="model.int8.onnx", sha256="0" * 64, bytes=1, opset=18,
            min_onnxruntime="1.17", recipe={"method": "x"},
            parity=Parity(probes=1, cos_min=0.98, cos_mean=0.99, topk=1, topk_agreement=1.0, worst_text="a"),
        )},
    )
    fields.update(changes)
    return Manifest(**fields)


def test_json_round_trip(tmp_path):
    manifest = _manifest()
    manifest.write(tmp_path / "manifest.json")
    assert Manifest.read(tmp_path / "manifest.json") == manifest


def test_matryoshka_dims():
    manifest = _manifest()
    assert manifest.check_dimensions(None) == 1024
    assert manifest.check_dimensions(32) == 32
    for bad in (31, 1025, 0, -1):
        with pytest.raises(InvalidInputError, match="allows 32..1024"):
            manifest.check_dimensions(bad)
    with pytest.raises(InvalidInputError, match="integer"):
        manifest.check_dimensions("64")


def test_full_dim_only_without_matryoshka():
    manifest = _manifest(matryoshka_min_dim=None, dim=384)
    assert manifest.check_dimensions(384) == 384
    with pytest.raises(InvalidInputError, match="no Matryoshka"):
        manifest.check_dimensions(128)


def test_refuses_unknown_schema_and_malformed(tmp_path):
    data = json.loads(_manifest().to_json())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99"):
        Manifest.read(tmp_path / "manifest.json")
    del data["pooling"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed"):
        Manifest.read(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        Manifest.read(tmp_path / "manifest.json")


@pytest.mark.parametrize(
    ("line", "cpus"),
    [("max 100000", None), ("200000 100000", 2.0), ("50000 100000", 0.5), ("", None), ("junk", None)],
)
def test_cgroup_cpu_limit(line, cpus):
    assert cgroup_cpu_limit(line) == cpus


def test_a_device_judges_a_variant_by_the_gate_it_was_shipped_with():
    from edge_embed.parity import Gates

    shipped = Gates(int8_cos_mean=0.995, int8_cos_min=0.98)
    recorded = Gates.recorded("int8", {"gate": shipped.record("int8")})
    assert (recorded.int8_cos_mean, recorded.int8_cos_min, recorded.batch_cos_min) == (0.995, 0.98, 0.99999)
    legacy = Gates.recorded("int8", {"method": "onnxruntime dynamic quantization"})  # a bundle from before
    assert (legacy.int8_cos_mean, legacy.int8_cos_min) == (0.99, 0.97)
    assert Gates.recorded("fp16", {"gate": Gates(fp16_cos_min=0.9995).record("fp16")}).fp16_cos_min == 0.9995
