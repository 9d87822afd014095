"""The registry's estimates, `edge-embed check` verdicts and bundle measurements."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from edge_embed.check import FEASIBLE, NOT_FEASIBLE, TIGHT, check, check_specs, judge, render_check
from edge_embed.errors import ModelNotFoundError
from edge_embed.memory import measure_footprint, stored_footprint
from edge_embed.platform import GpuInfo, PlatformInfo
from edge_embed.registry import PRECISIONS, REGISTRY, Limits, estimate, find_model

GiB = 1024**3
# The product's reference case: a 16 GB Apple Silicon Mac with 4.9 GB of free disk.
MAC_16GB = PlatformInfo(os="darwin", arch="arm64", apple_chip="Apple M2", cpus=8, memory_bytes=16 * GiB,
                        disk_free_bytes=4_900_000_000, runtimes={"mlx": "0.30.0"})
JETSON_ORIN_NANO = PlatformInfo(os="linux", arch="aarch64", jetson_model="NVIDIA Jetson Orin Nano Developer Kit",
                                l4t_release="36.4.3", cpus=6, memory_bytes=8 * GiB, disk_free_bytes=40_000_000_000,
                                gpus=(GpuInfo("Orin"),))
X86_GPU = PlatformInfo(os="linux", arch="x86_64", cpus=16, memory_bytes=64 * GiB, disk_free_bytes=500_000_000_000,
                       gpus=(GpuInfo("Tesla T4", 15 * GiB),))


def test_the_registry_covers_the_models_users_bring():
    expected = {
        "qwen3-embedding-0.6b", "qwen3-embedding-4b", "qwen3-embedding-8b", "qwen3-vl-embedding-2b",
        "qwen3-vl-embedding-8b", "qwen3-reranker-0.6b", "qwen3-reranker-4b", "qwen3-reranker-8b",
        "qwen3-vl-reranker-8b", "all-minilm-l6-v2", "bge-small-en-v1.5", "bge-base-en-v1.5", "bge-m3",
        "gte-qwen2-1.5b-instruct", "stella-en-1.5b-v5", "jina-embeddings-v2-base-en", "nv-embed-v2",
        "clip-vit-b-32", "colqwen3-8b", "colqwen3-4b", "qwen3-vl-reranker-2b",
    }
    assert set(REGISTRY) == expected
    for spec in REGISTRY.values():
        assert spec.params > 0 and spec.dim > 0 and spec.max_context > 0 and spec.license and spec.pooling
        sizes = [estimate(spec, p).weights for p in PRECISIONS]
        assert sizes[0] > sizes[1], spec.name  # fp32 > fp16
        assert sizes[2] < sizes[0] and sizes[3] < sizes[2], spec.name


def test_weights_follow_parameters_and_bytes_per_weight():
    qwen = find_model("Qwen/Qwen3-Embedding-0.6B")  # Hugging Face ids work too
    assert estimate(qwen, "fp32").weights == qwen.params * 4
    assert estimate(qwen, "fp16").weights == qwen.params * 2
    # INT8 stores the 151,669 x 1024 token-embedding table as int8 rows, as the export
    # does: one byte a weight throughout (it was 1.06 GB with the table left FP32).
    assert estimate(qwen, "int8").weights == qwen.params
    minilm = find_model("all-minilm-l6-v2")
    assert estimate(minilm, "fp32").weights == pytest.approx(90.9e6, rel=0.01)  # model.fp32.onnx is 90.9 MB


def test_planning_figures_sit_beside_the_estimates():
    """Where the earlier planning table counted weights plus 10-20%, the weights agree within 25%."""
    for spec in REGISTRY.values():
        if spec.planning_mb is None or spec.name == "jina-embeddings-v2-base-en":
            continue
        weights_mb = estimate(spec, spec.planning_precision).weights / 1e6
        assert spec.planning_mb / 1.25 <= weights_mb * 1.1 <= spec.planning_mb * 1.25, spec.name
    # Jina v2 base has 137 M parameters: 549 MB in FP32 alone, above the planned 400 MB.
    assert estimate(find_model("jina-embeddings-v2-base-en"), "fp32").weights > 400e6


def test_unknown_names_get_suggestions():
    with pytest.raises(ModelNotFoundError, match="did you mean qwen3-embedding-0.6b"):
        find_model("qwen3-embeding-0.6b")


def test_the_verdict_rule():
    assert judge(80, 100) == FEASIBLE
    assert judge(81, 100) == TIGHT and judge(100, 100) == TIGHT
    assert judge(101, 100) == NOT_FEASIBLE


def test_16gb_mac_cannot_run_the_8b_vl_embedding_and_reranker_pair():
    pair = [find_model("qwen3-vl-embedding-8b"), find_model("qwen3-vl-reranker-8b")]
    fp16 = check_specs(pair, "fp16", MAC_16GB)
    verdicts = {r.resource: r.verdict for r in fp16.resources}
    assert verdicts == {"memory": NOT_FEASIBLE, "gpu memory": NOT_FEASIBLE, "disk": NOT_FEASIBLE}
    assert fp16.resources[2].required > 32e9  # 32+ GB of fp16 weights to download
    int8 = check_specs(pair, "int8", MAC_16GB)
    assert int8.verdict == NOT_FEASIBLE
    memory = int8.resources[0]
    assert memory.required > 16 * GiB  # no headroom left at INT8 either
    changes = [s["change"] for s in int8.suggestions]
    assert changes and all("embedding only" in c and "qwen3-vl-embedding-2b" in c for c in changes)
    text = render_check(int8)
    assert "NOT FEASIBLE" in text and "What would fit" in text and "80%" in text


def test_16gb_mac_runs_qwen3_embedding_0_6b_int8():
    report = check_specs([find_model("qwen3-embedding-0.6b")], "int8", MAC_16GB)
    assert {r.resource: r.verdict for r in report.resources} == {
        "memory": FEASIBLE, "gpu memory": FEASIBLE, "disk": FEASIBLE}
    assert report.verdict == FEASIBLE and not report.suggestions


def test_suggestions_cover_precision_and_reranker():
    fp32 = check_specs([find_model("qwen3-embedding-4b")], "fp32", JETSON_ORIN_NANO)
    assert fp32.verdict == NOT_FEASIBLE
    # The most accurate precision that fits comes first: INT8, now that its vocabulary
    # table is int8 rows too (6.2 GB of the Orin Nano's 6.4 GB at 80 %).
    assert fp32.suggestions[0]["precision"] == "int8"
    assert "int4" in {s.get("precision") for s in fp32.suggestions}
    gpu = {r.resource: r for r in check_specs([find_model("qwen3-embedding-8b")], "fp16", X86_GPU).resources}
    assert gpu["gpu memory"].available == 15 * GiB and gpu["gpu memory"].verdict == NOT_FEASIBLE
    assert gpu["memory"].verdict == FEASIBLE
    reranker_only = check_specs([find_model("qwen3-reranker-8b")], "fp16", JETSON_ORIN_NANO)
    assert any("embedding only" in s["change"] or "sibling" in s["change"] for s in reranker_only.suggestions)


def test_export_here_counts_the_source_and_the_fp32_graph():
    spec = find_model("qwen3-embedding-0.6b")
    bundle_only = check_specs([spec], "int8", MAC_16GB).resources[-1]
    export_here = check_specs([spec], "int8", MAC_16GB, export_here=True).resources[-1]
    assert bundle_only.verdict == FEASIBLE
    assert export_here.required == pytest.approx(spec.params * 2 + spec.params * 4 + bundle_only.required, rel=1e-6)
    assert export_here.verdict == TIGHT  # 4.65 GB of the 4.9 GB free


def test_activations_grow_with_the_limits():
    spec = find_model("qwen3-embedding-0.6b")
    small = spec.activation_bytes(Limits(1024, 128))
    assert spec.activation_bytes(Limits(4096, 512)) > 4 * small


def test_a_bundle_is_measured_and_the_measurement_is_stored(minilm_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_EMBED_CACHE", str(tmp_path))
    footprint = measure_footprint(minilm_bundle, "fp32")
    assert footprint.batch_shape == (16, 256)  # the 4096-token budget with the longest texts
    assert 60e6 < footprint.resident < 600e6  # an 87 MB graph plus the session
    assert footprint.batch_peak is not None and footprint.batch_peak > 10e6
    stored = stored_footprint(footprint.variant_sha256, None, 4096)
    assert stored == footprint
    report = check([str(minilm_bundle)], "fp32")
    need = report.models[0]
    assert need.source.startswith("measured on this device")
    assert need.memory == footprint.total(0) and need.disk == 0 and need.on_disk > 0


def test_check_cli_json_and_exit_codes(tmp_path):
    env_run = dict(capture_output=True, text=True, cwd=tmp_path, timeout=120)
    ok = subprocess.run([sys.executable, "-m", "edge_embed.cli", "check", "all-minilm-l6-v2", "--json"], **env_run)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["verdict"] in (FEASIBLE, TIGHT) and data["models"][0]["name"] == "all-minilm-l6-v2"
    huge = subprocess.run([sys.executable, "-m", "edge_embed.cli", "check", "nv-embed-v2", "qwen3-vl-embedding-8b",
                           "qwen3-embedding-8b", "--precision", "fp32"], **env_run)
    assert huge.returncode == 9 and "NOT FEASIBLE" in huge.stdout
    unknown = subprocess.run([sys.executable, "-m", "edge_embed.cli", "check", "no-such-model"], **env_run)
    assert unknown.returncode == 2 and unknown.stderr.startswith("edge-embed: error:") and "Traceback" not in unknown.stderr
    listing = subprocess.run([sys.executable, "-m", "edge_embed.cli", "models"], **env_run)
    assert listing.returncode == 0 and "qwen3-vl-reranker-8b" in listing.stdout and "16,000 (fp16)" in listing.stdout


@pytest.mark.slow
def test_an_embedder_and_reranker_pair_of_real_bundles(qwen3_bundle, qwen3_reranker_bundle, tmp_path, monkeypatch):
    """Both bundles measured here, their sum judged; on a device too small for the pair the
    advice is the embedder alone, with its figures."""
    monkeypatch.setenv("EDGE_EMBED_CACHE", str(tmp_path))
    here = check([str(qwen3_bundle), str(qwen3_reranker_bundle)], "int8")
    embedder, reranker = here.models
    assert (embedder.kind, reranker.kind) == ("embedding", "reranker")
    assert all(n.source.startswith("measured on this device") for n in here.models)
    assert here.resources[0].required > embedder.memory + reranker.memory  # plus the process base
    assert here.verdict == FEASIBLE and "reranker" in render_check(here)
    # A device with room for the process and the embedder, not both models.
    from edge_embed.registry import PROCESS_BASE_BYTES

    room = int((PROCESS_BASE_BYTES + embedder.memory + reranker.memory // 2) / 0.8)
    small = PlatformInfo(os="linux", arch="aarch64", cpus=4, memory_bytes=room, disk_free_bytes=10 * GiB)
    tight = check([str(qwen3_bundle), str(qwen3_reranker_bundle)], "int8", info=small)
    assert tight.verdict != FEASIBLE
    (advice,) = tight.suggestions
    assert advice["models"] == ["tiny-qwen3"] and "no reranker" in advice["change"]
    assert advice["resources"]["memory"] == PROCESS_BASE_BYTES + embedder.memory


def test_check_says_what_one_image_costs_a_vision_language_model():
    """Qwen3-VL's tower at Qwen3-VL-Embedding's 1800 x 32 x 32 pixels: 7,200 patches; with
    flash attention (no N² scores) the activations grow with the patches, not their square."""
    spec = find_model("qwen3-vl-embedding-2b")
    assert spec.vision.patches() == 7200 and spec.vision.patches(448 * 448) == 784
    assert spec.vision.activation_bytes() * 784 == spec.vision.activation_bytes(448 * 448) * 7200
    text = render_check(check_specs([spec], "int8", MAC_16GB))
    assert "one image at 1,843,200 pixels (7,200 patches)" in text and "--max-pixels" in text
    assert "one image" not in render_check(check_specs([find_model("qwen3-embedding-0.6b")], "int8", MAC_16GB))


@pytest.mark.parametrize("device, model, verdicts", [
    # fp16, int8, int4
    ("a100-40gb", "colqwen3-8b", (FEASIBLE, FEASIBLE, FEASIBLE)),
    ("a100-40gb", "qwen3-vl-reranker-8b", (FEASIBLE, FEASIBLE, FEASIBLE)),
    ("mac-16gb", "colqwen3-8b", (NOT_FEASIBLE, NOT_FEASIBLE, FEASIBLE)),
    ("mac-16gb", "colqwen3-4b", (NOT_FEASIBLE, FEASIBLE, FEASIBLE)),
    ("mac-16gb", "qwen3-vl-reranker-2b", (FEASIBLE, FEASIBLE, FEASIBLE)),
    ("jetson-orin-8gb", "colqwen3-8b", (NOT_FEASIBLE, NOT_FEASIBLE, TIGHT)),
    ("jetson-orin-8gb", "colqwen3-4b", (NOT_FEASIBLE, FEASIBLE, FEASIBLE)),
    ("jetson-orin-8gb", "qwen3-vl-reranker-2b", (FEASIBLE, FEASIBLE, FEASIBLE)),
])
def test_check_answers_for_the_devices_users_plan_for(device, model, verdicts):
    """The visual-document stack on an A100 40 GB, a 16 GB Mac and an 8 GB Jetson: the 8B
    models fit the A100 at 16 bits, a 16 GB Mac only at INT4 and an 8 GB Jetson only
    tightly at INT4 (the vision tower in INT8 under INT4); the 4B ColQwen3 fits both at
    INT8."""
    assert tuple(check([model], p, device=device).verdict for p in ("fp16", "int8", "int4")) == verdicts


def test_a_vision_language_models_tower_counts_at_int8_in_its_quantized_variants():
    """INT8/INT4 run the tower per token in INT8 (as the export does where the gate passes):
    its weights count at 1 byte there, 2 at FP16."""
    spec = find_model("colqwen3-8b")
    tower = spec.vision.params(spec.hidden)
    assert 0.5e9 < tower < 0.65e9  # Qwen3-VL-8B's vision tower and its four mergers
    text_only = dataclasses.replace(spec, vision=None)
    assert spec.weight_bytes("fp16") == pytest.approx(text_only.weight_bytes("fp16"), rel=1e-9)
    assert spec.weight_bytes("int4") - text_only.weight_bytes("int4") == pytest.approx(tower * (1 - 0.625), rel=1e-6)
    assert spec.weight_bytes("int8") == pytest.approx(text_only.weight_bytes("int8"), rel=1e-9)


def test_check_cli_takes_a_device_profile():
    done = subprocess.run([sys.executable, "-m", "edge_embed.cli", "check", "colqwen3-4b", "--device", "jetson-orin-8gb",
                           "--precision", "int4", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == FEASIBLE and "Jetson Orin Nano 8 GB" in report["device"]
    with pytest.raises(Exception, match="is not one of"):
        check(["colqwen3-4b"], device="raspberry-pi")
