"""Build export/data/retrieval_probes.json.gz: the retrieval-agreement probe corpus.

The export pipeline gates quantized embedders on whether they rank passages as the FP32
reference does. This one-off tool, kept for provenance, builds the corpus it ranks from
real text: Debian bookworm package descriptions. A package's synopsis is the query a user
would type, its long description the passage written for it, and other packages' long
descriptions are the distractors. English gives 1,000 queries over 1,150 passages; German,
French, Spanish, Russian, Chinese (zh_CN) and Japanese give 60 queries over 90 passages
each, from the Debian translations (packages are used in one language only).

Usage (from the repository root; downloads about 20 MB once, then runs offline):

    .venv/bin/python scripts/build_probe_corpus.py
    .venv/bin/python scripts/build_probe_corpus.py --cache-dir /tmp/src --mirror http://ftp.de.debian.org/debian

Sources, fetched into the cache directory (default ~/.cache/edge-embed/probe-sources) and
reused when present: dists/bookworm/main/i18n/Translation-en.xz and Translation-{de,fr,es,
ru,zh_CN,ja}.bz2; binary-amd64/Packages.xz for each package's Section (the domain) and
source package, read instead from this machine's apt list of it when that exists and lz4
is installed (or from --packages). A file already in the cache is not fetched again, so
deleting the cache rebuilds from whatever the mirror serves then.

Selection, deterministic for given sources (sorted, then sampled with a fixed seed):
- drop boilerplate: -dev, -doc, -dbg, -dbgsym, -data, -common, -perl, python3-*, lib*
  packages and library/debug/doc sections; long descriptions shared by several packages;
  transitional, dummy and metapackages; synopses under 3 words; passages under 12 words;
- keep one package per source package, so no passage is a near copy of another;
- queries are synopses as written, without a leading "<package> - " or "<package>:"; a
  query that still names its package (longer than 3 characters) is dropped;
- passages keep paragraphs (blank-line separated) and verbatim lines, and are cut at a
  paragraph or sentence end to at most ~180 words (two CJK characters count as one word);
- domains are stratified round-robin over sections, none above ~8% of a language's set.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import json
import lzma
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "export" / "data" / "retrieval_probes.json.gz"
DEFAULT_CACHE = Path.home() / ".cache" / "edge-embed" / "probe-sources"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
APT_PACKAGES_LZ4 = Path("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4")

SEED = 20240917
MAX_WORDS = 180
MIN_PASSAGE_WORDS = 12
MIN_QUERY_WORDS = 3
SECTION_SHARE = 0.08
# Output language code -> Debian translation code.
TRANSLATIONS = {"de": "de", "fr": "fr", "es": "es", "ru": "ru", "zh": "zh_CN", "ja": "ja"}
SIZES = {"en": (1000, 1150), **{lang: (60, 90) for lang in TRANSLATIONS}}

DROP_SUFFIXES = ("-dev", "-doc", "-dbg", "-dbgsym", "-data", "-common", "-perl")
DROP_PREFIXES = ("python3-", "lib")
# Sections that hold libraries, debug symbols, documentation, translations and packaging glue.
DROP_SECTIONS = {"libs", "oldlibs", "libdevel", "debug", "doc", "metapackages", "localization",
                 "translations", "introspection", "tasks"}
BOILERPLATE = re.compile(r"transitional|dummy package|meta-?package", re.IGNORECASE)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
CJK_WRAP = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
# A sentence ends at . ! ? (and closing quotes/brackets) before whitespace and a letter
# (a capital, where the script has case; checked in sentence_cuts),
# or at a CJK full stop, exclamation or question mark.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(]?[^\W\d_])|[。！？]")
ABBREVIATIONS = {"e.g.", "i.e.", "vs.", "cf.", "etc.)", "approx.", "no.", "dr.", "mr.", "st.", "z.b.", "d.h.", "bzw."}


@dataclass(frozen=True)
class Entry:
    """One package's description in one language."""

    package: str
    synopsis: str
    paragraphs: tuple[str, ...]  # text paragraphs joined to one line; verbatim blocks keep their lines


@dataclass(frozen=True)
class Candidate:
    package: str
    source: str
    domain: str
    query: str | None  # None: usable as a distractor only
    passage: str


def word_count(text: str) -> int:
    """Whitespace-separated words that hold a letter or digit; two CJK characters count as one."""
    cjk = len(CJK.findall(text))
    words = [w for w in CJK.sub(" ", text).split() if re.search(r"\w", w)]
    return len(words) + (cjk + 1) // 2


def fetch(url: str, dest: Path) -> Path:
    """Download url to dest once; later runs reuse the cached file."""
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".part")
    print(f"fetching {url}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=120) as response, partial.open("wb") as out:
        shutil.copyfileobj(response, out)
    partial.replace(dest)
    return dest


def read_compressed(path: Path) -> str:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".bz2":
        return bz2.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".lz4":
        return subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout.decode("utf-8")
    return path.read_text(encoding="utf-8")


def stanzas(text: str):
    """Debian control (RFC 822 style) records: dicts of field -> value, continuation lines kept."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and name is not None:
                fields[name] += "\n" + line
            else:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields:
            yield fields


def parse_description(value: str, package: str) -> Entry:
    """First line is the synopsis; then " ." breaks paragraphs and lines starting with two
    spaces are verbatim (kept as lines, dedented as a block)."""
    synopsis, *lines = value.split("\n")
    paragraphs: list[str] = []
    prose: list[str] = []
    verbatim: list[str] = []

    def flush_prose() -> None:
        if prose:
            text = prose[0]
            for line in prose[1:]:  # CJK text wrapped over lines joins without a space
                text += line if CJK_WRAP.search(text[-1]) and CJK_WRAP.match(line) else " " + line
            paragraphs.append(text)
            prose.clear()

    def flush_verbatim() -> None:
        if verbatim:
            indent = min(len(v) - len(v.lstrip()) for v in verbatim)
            paragraphs.append("\n".join(v[indent:].rstrip() for v in verbatim))
            verbatim.clear()

    for line in lines:
        body = line[1:]
        if body.strip() == ".":
            flush_prose()
            flush_verbatim()
        elif body.startswith(" "):
            flush_prose()
            verbatim.append(body)
        else:
            flush_verbatim()
            prose.append(body.strip())
    flush_prose()
    flush_verbatim()
    return Entry(package, synopsis.strip(), tuple(p for p in paragraphs if p.strip()))


def translations(path: Path, field: str) -> dict[tuple[str, str], Entry]:
    """(package, Description-md5 of the English text) -> entry."""
    out = {}
    for record in stanzas(read_compressed(path)):
        if field in record and "Package" in record:
            key = (record["Package"], record.get("Description-md5", ""))
            out[key] = parse_description(record[field], record["Package"])
    return out


def sentence_cuts(paragraph: str) -> list[int]:
    """Offsets just after each sentence end inside a prose paragraph."""
    cuts = []
    for match in SENTENCE_END.finditer(paragraph):
        if match.group().startswith("."):
            word = paragraph[: match.end()].split()[-1].lower() if paragraph[: match.end()].split() else ""
            if word in ABBREVIATIONS or re.fullmatch(r"\w\.", word):  # abbreviation or initial
                continue
            following = re.search(r"[^\W\d_]", paragraph[match.end():]).group()
            if following.lower() != following.upper() and not following.isupper():
                continue
        cuts.append(match.end())
    return cuts


def cut_passage(paragraphs: tuple[str, ...], limit: int = MAX_WORDS) -> str | None:
    """Whole paragraphs while they fit in `limit` words, else the first paragraph cut at its
    last sentence end that fits; None when even the first sentence is too long."""
    kept: list[str] = []
    for paragraph in paragraphs:
        if word_count("\n\n".join([*kept, paragraph])) <= limit:
            kept.append(paragraph)
            continue
        if kept:
            break
        if "\n" in paragraph:  # a verbatim block: cut between its lines
            lines = paragraph.split("\n")
            while lines and word_count("\n".join(lines)) > limit:
                lines.pop()
            return "\n".join(lines) or None
        fitting = [c for c in sentence_cuts(paragraph) if word_count(paragraph[:c]) <= limit]
        return paragraph[: fitting[-1]].strip() if fitting else None
    return "\n\n".join(kept) or None


def clean_query(synopsis: str, package: str) -> str | None:
    """The synopsis without a leading "<package> - " or "<package>:", or None if unusable."""
    query = synopsis.strip()
    match = re.match(re.escape(package) + r"(\s+-\s+|\s*:\s*)", query, re.IGNORECASE)
    if match:
        query = query[match.end():].strip()
    if word_count(query) < MIN_QUERY_WORDS:
        return None
    if len(package) > 3 and any(name in query.lower() for name in (package.lower(), package.lower().replace("-", " "))):
        return None
    return query


def normalized(paragraphs: tuple[str, ...]) -> str:
    return " ".join(" ".join(paragraphs).split())


def load_packages(packages_path: Path) -> dict[str, dict[str, str]]:
    out = {}
    for record in stanzas(read_compressed(packages_path)):
        source = record.get("Source", record["Package"]).split()[0]
        section = record.get("Section", "misc").split("/")[-1]
        out[record["Package"]] = {"md5": record.get("Description-md5", ""), "section": section, "source": source}
    return out


def package_is_boilerplate(name: str, section: str) -> bool:
    return name.endswith(DROP_SUFFIXES) or name.startswith(DROP_PREFIXES) or section in DROP_SECTIONS


def shared_descriptions(english: dict[tuple[str, str], Entry]) -> set[str]:
    """Normalized long descriptions that more than one package has."""
    counts = collections.Counter(text for _, text in {(e.package, normalized(e.paragraphs)) for e in english.values()})
    return {text for text, n in counts.items() if n > 1}


def candidates(english: dict[tuple[str, str], Entry], shared: set[str], packages: dict[str, dict[str, str]],
               translated: dict[tuple[str, str], Entry] | None) -> list[Candidate]:
    """Usable packages for one language (English when `translated` is None)."""
    out = []
    for name in sorted(packages):
        info = packages[name]
        key = (name, info["md5"])
        entry = english.get(key)
        if entry is None or package_is_boilerplate(name, info["section"]):
            continue
        if normalized(entry.paragraphs) in shared:
            continue
        if BOILERPLATE.search(entry.synopsis) or BOILERPLATE.search(normalized(entry.paragraphs)):
            continue
        if translated is not None:
            text = translated.get(key)
            if text is None or text.synopsis == entry.synopsis or normalized(text.paragraphs) == normalized(entry.paragraphs):
                continue
            if not text.paragraphs:
                continue
            entry = text
        passage = cut_passage(entry.paragraphs)
        if passage is None or word_count(passage) < MIN_PASSAGE_WORDS:
            continue
        out.append(Candidate(name, info["source"], info["section"], clean_query(entry.synopsis, name), passage))
    return out


def round_robin(pool: list[Candidate], count: int, cap: int, taken: collections.Counter,
                rng: random.Random) -> list[Candidate]:
    """Take `count` candidates one section at a time (sections in sorted order, each shuffled),
    skipping sections that already hold `cap` (counted in `taken`, which is updated)."""
    by_section: dict[str, list[Candidate]] = collections.defaultdict(list)
    for cand in pool:
        by_section[cand.domain].append(cand)
    queues = {}
    for section in sorted(by_section):
        items = sorted(by_section[section], key=lambda c: c.package)
        rng.shuffle(items)
        queues[section] = items
    picked: list[Candidate] = []
    while len(picked) < count:
        progress = False
        for section, items in queues.items():
            if len(picked) == count:
                break
            if items and taken[section] < cap:
                picked.append(items.pop())
                taken[section] += 1
                progress = True
        if not progress:
            raise SystemExit(f"only {len(picked)} of {count} candidates fit the section cap {cap}")
    return picked


def select(pool: list[Candidate], n_queries: int, n_passages: int, used_sources: set[str],
           rng: random.Random) -> tuple[list[Candidate], list[Candidate]]:
    """(query candidates, distractors): one package per source package, not used before."""
    seen_sources, seen_queries, seen_passages, unique = set(used_sources), set(), set(), []
    order = sorted(pool, key=lambda c: c.package)
    rng.shuffle(order)
    for cand in order:
        query_key = cand.query.casefold() if cand.query else None
        if cand.source in seen_sources or cand.passage in seen_passages:
            continue
        if query_key is not None and query_key in seen_queries:
            cand = Candidate(cand.package, cand.source, cand.domain, None, cand.passage)
        seen_sources.add(cand.source)
        seen_passages.add(cand.passage)
        if query_key is not None:
            seen_queries.add(query_key)
        unique.append(cand)
    taken: collections.Counter = collections.Counter()
    cap = math.ceil(SECTION_SHARE * n_passages)
    with_query = round_robin([c for c in unique if c.query], n_queries, math.ceil(SECTION_SHARE * n_queries),
                             collections.Counter(), rng)
    taken.update(c.domain for c in with_query)
    chosen = {c.package for c in with_query}
    rest = round_robin([c for c in unique if c.package not in chosen], n_passages - n_queries, cap, taken, rng)
    used_sources.update(c.source for c in [*with_query, *rest])
    return with_query, rest


def build(cache: Path, mirror: str, packages_file: Path | None, seed: int) -> dict:
    base = f"{mirror.rstrip('/')}/dists/{SUITE}/main"
    english = translations(fetch(f"{base}/i18n/Translation-en.xz", cache / "Translation-en.xz"), "Description-en")
    if packages_file is None:
        packages_file = fetch(f"{base}/binary-amd64/Packages.xz", cache / "Packages.xz")
    packages = load_packages(packages_file)
    shared = shared_descriptions(english)
    rng = random.Random(seed)
    used_sources: set[str] = set()
    chosen: dict[str, tuple[list[Candidate], list[Candidate]]] = {}
    # The small translated pools pick first, so English (the largest pool) cannot starve them.
    for lang, code in TRANSLATIONS.items():
        path = fetch(f"{base}/i18n/Translation-{code}.bz2", cache / f"Translation-{code}.bz2")
        pool = candidates(english, shared, packages, translations(path, f"Description-{code}"))
        chosen[lang] = select(pool, *SIZES[lang], used_sources, rng)
    chosen["en"] = select(candidates(english, shared, packages, None), *SIZES["en"], used_sources, rng)

    passages, queries = [], []
    for lang in ["en", *TRANSLATIONS]:
        with_query, rest = chosen[lang]
        items = [*with_query, *rest]
        rng.shuffle(items)
        start = len(passages)
        index = {c.package: start + i for i, c in enumerate(items)}
        passages += [{"text": c.passage, "lang": lang, "domain": c.domain} for c in items]
        ordered = sorted(with_query, key=lambda c: c.package)
        rng.shuffle(ordered)
        queries += [{"text": c.query, "lang": lang, "domain": c.domain, "passage": index[c.package]} for c in ordered]
    files = ", ".join(["Translation-en.xz", *(f"Translation-{c}.bz2" for c in TRANSLATIONS.values())])
    return {
        "source": f"Debian {SUITE} main package descriptions ({mirror.rstrip('/')}/dists/{SUITE}/main/i18n/: "
                  f"{files}; sections from binary-amd64/Packages)",
        "built_by": "scripts/build_probe_corpus.py",
        "license_note": "Debian package descriptions (each under its package's license)",
        "passages": passages,
        "queries": queries,
    }


def summary(corpus: dict) -> str:
    lines = [f"{'lang':<5} {'queries':>7} {'passages':>8} {'words min':>9} {'median':>6} {'max':>4}"
             f" {'query words min':>15} {'median':>6} {'max':>4}"]
    langs = list(dict.fromkeys(p["lang"] for p in corpus["passages"]))
    for lang in langs:
        pw = [word_count(p["text"]) for p in corpus["passages"] if p["lang"] == lang]
        qw = [word_count(q["text"]) for q in corpus["queries"] if q["lang"] == lang]
        lines.append(f"{lang:<5} {len(qw):>7} {len(pw):>8} {min(pw):>9} {statistics.median(pw):>6g} {max(pw):>4}"
                     f" {min(qw):>15} {statistics.median(qw):>6g} {max(qw):>4}")
    lines.append("")
    lines.append(f"{'domain':<14} " + " ".join(f"{lang:>4}" for lang in langs) + "  queries")
    domains = collections.Counter((p["domain"], p["lang"]) for p in corpus["passages"])
    query_domains = collections.Counter(q["domain"] for q in corpus["queries"])
    for domain in sorted({d for d, _ in domains}):
        lines.append(f"{domain:<14} " + " ".join(f"{domains[domain, lang]:>4}" for lang in langs)
                     + f"  {query_domains[domain]:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the Debian files are kept")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror base URL")
    parser.add_argument("--packages", type=Path, default=None,
                        help="a Packages file (.xz, .lz4 or plain) to read sections from; default: the local apt "
                             "list when `lz4` is installed, else binary-amd64/Packages.xz from the mirror")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    packages_file = args.packages
    if packages_file is None and APT_PACKAGES_LZ4.exists() and shutil.which("lz4"):
        packages_file = APT_PACKAGES_LZ4
    corpus = build(args.cache_dir.expanduser(), args.mirror, packages_file, args.seed)
    data = json.dumps(corpus, sort_keys=True, ensure_ascii=False).encode("utf-8")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(summary(corpus))
    print(f"\nwrote {args.output} ({args.output.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
