"""Text for calibration and evaluation: the default Jane Austen corpus, plain-text files, WikiText-2.

Default corpus
    Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (text public domain,
    package MIT). The first call runs ``apt-get download r-cran-janeaustenr`` (and
    ``apt-get update`` once if the package index is empty, as on a fresh CI machine), unpacks the
    .deb with ``dpkg -x`` and reads R's lazy-load database
    ``usr/lib/R/site-library/janeaustenr/data/Rdata.rdx/.rdb`` with ``rdata``. Each novel is a
    character vector of lines; lines are joined with ``"\\n"``. The novels are then cached as
    UTF-8 text files, so later runs do no apt work:

        $TKR_CACHE/austen/<name>.txt      (default $TKR_CACHE: ~/.cache/triton-kernels-research)

Default split (``default_split()``)
    calibration: Sense and Sensibility, Mansfield Park, Northanger Abbey, Persuasion
    evaluation:  Pride and Prejudice
    second evaluation text: Emma (:func:`second_evaluation_text`; held out of calibration and of the
    main evaluation, so every point is also scored on a second unseen novel: the ``ppl2`` columns)
    Calibration and the two evaluation texts never share a novel (``tests/test_data.py`` also checks
    that no calibration window occurs in either evaluation text). Several novels are joined with a
    blank line (``"\\n\\n"``) between them. ``--text-file`` and WikiText-2 have no second text.

``--text-file``
    The first 10% of the characters (extended to the end of that line) is calibration text, the
    remaining 90% evaluation text, so the evaluation windows never overlap calibration text.

WikiText-2 (``source="wikitext2"``, needs ``datasets`` and network on first use)
    ``wikitext-2-raw-v1``: calibration from the train split, evaluation from the test split, each
    joined with ``"\\n\\n"`` as in the GPTQ reference code.

Token windows
    Text is tokenized without special tokens (no BOS): ``calibration_batches`` draws seeded random
    windows, ``eval_tokens`` cuts non-overlapping windows from the start of the evaluation text.
"""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

from experiments.core.errors import SetupError

# R object name in the janeaustenr package -> title. Order is publication order.
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEBIAN_PACKAGE = "r-cran-janeaustenr"
_RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
SOURCES = ("austen", "wikitext2")

# Default evaluation budget: 16 windows of 1024 tokens of Pride and Prejudice, ~30 s for the default
# model at the ~540 tok/s PLATFORM.md measured on an idle 2-core CPU; quick mode uses 8 windows of 512.
EVAL_SEQLEN = 1024
EVAL_MAX_TOKENS = 16384
QUICK_EVAL_SEQLEN = 512
QUICK_EVAL_MAX_TOKENS = 4096

TEXT_FILE_CALIBRATION_FRACTION = 0.10


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$TKR_CACHE``, else ``~/.cache/triton-kernels-research``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TKR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "triton-kernels-research"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared between users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_MANUAL = (f"Fetch it by hand on a Debian/Ubuntu machine:\n"
           f"    apt-get update && apt-get download {DEBIAN_PACKAGE}\n"
           f"    dpkg -x {DEBIAN_PACKAGE}_*.deb <dir>\n"
           f"and then call experiments.lm.data.extract_austen('<dir>'), or use --text-file instead.")


def _apt_download(workdir: Path) -> Path:
    """Download the .deb into ``workdir``; run ``apt-get update`` once if the index does not know it."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SetupError(f"The default corpus needs apt-get and dpkg, which are not on PATH. {_MANUAL}")

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir,
                              capture_output=True, text=True)

    res = download()
    if res.returncode != 0:
        # A fresh machine (CI) has an empty package index; updating it needs root.
        upd = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        res = download()
        if res.returncode != 0:
            raise SetupError(f"`apt-get download {DEBIAN_PACKAGE}` failed:\n{res.stderr.strip()}\n"
                               f"(`apt-get update` said: {upd.stderr.strip()[-500:] or 'ok'})\n{_MANUAL}")
    debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise SetupError(f"apt-get reported success but no {DEBIAN_PACKAGE}_*.deb appeared in {workdir}. {_MANUAL}")
    return debs[-1]


def extract_austen(root: str | os.PathLike) -> dict[str, str]:
    """Read the six novels from an unpacked janeaustenr package (the directory given to ``dpkg -x``).

    Returns R object name -> text with lines joined by ``"\\n"``.
    """
    import rdata  # noqa: PLC0415 - only needed on first extraction

    data = Path(root) / _RDATA_DIR
    rdx_path, rdb_path = data / "Rdata.rdx", data / "Rdata.rdb"
    if not rdx_path.is_file() or not rdb_path.is_file():
        raise FileNotFoundError(f"{rdx_path} / {rdb_path} not found: is {root} an unpacked {DEBIAN_PACKAGE}?")
    with warnings.catch_warnings():
        # rdata cannot tell a bare serialization from an .rds file and warns; both parse the same.
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_data(rdx_path.read_bytes()))
        rdb = rdb_path.read_bytes()
        novels = {}
        for name in AUSTEN_NOVELS:
            offset, length = (int(v) for v in index["variables"][name])
            blob = rdb[offset:offset + length]
            (size,) = struct.unpack(">I", blob[:4])
            raw = zlib.decompress(blob[4:])
            if len(raw) != size:
                raise ValueError(f"{rdb_path}: entry {name!r} decompressed to {len(raw)} bytes, header says {size}")
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            # R's NA_character_ converts to a non-str value; an empty line is what it means in these texts.
            novels[name] = "\n".join(line if isinstance(line, str) else "" for line in lines)
    return novels


def load_corpus(name: str = "austen", cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The six Austen novels, title -> text (see module docstring for the source and cache)."""
    if name != "austen":
        raise ValueError(f"corpus name={name!r} is not known; the only bundled corpus is 'austen' "
                         f"(use --text-file for your own text or source='wikitext2').")
    folder = cache_root(cache_dir) / "austen"
    paths = {key: folder / f"{key}.txt" for key in AUSTEN_NOVELS}
    if not all(p.is_file() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            deb = _apt_download(Path(tmp))
            unpacked = Path(tmp) / "root"
            res = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
            if res.returncode != 0:
                raise SetupError(f"`dpkg -x {deb.name}` failed: {res.stderr.strip()}\n{_MANUAL}")
            for key, text in extract_austen(unpacked).items():
                _write_text_atomic(paths[key], text)
    return {AUSTEN_NOVELS[key]: paths[key].read_text(encoding="utf-8") for key in AUSTEN_NOVELS}


def default_split() -> dict[str, list[str]]:
    """Titles used for calibration, for evaluation and for the second evaluation text by default
    (pairwise disjoint; see module docstring)."""
    return {
        "calibration": ["Sense and Sensibility", "Mansfield Park", "Northanger Abbey", "Persuasion"],
        "evaluation": ["Pride and Prejudice"],
        "evaluation2": ["Emma"],
    }


def second_evaluation_text(source: str = "austen", text_file: str | os.PathLike | None = None,
                           cache_dir: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """(description, text) of the second held-out evaluation text of a corpus source: for the default
    Austen corpus the novel(s) of ``default_split()["evaluation2"]`` (Emma), used by neither
    calibration nor the main evaluation; None for ``text_file`` and WikiText-2, which have none."""
    if text_file is not None or source != "austen":
        if text_file is None and source not in SOURCES:
            raise ValueError(f"source={source!r} is not known; accepted: {', '.join(SOURCES)}")
        return None
    novels = load_corpus("austen", cache_dir)
    titles = default_split()["evaluation2"]
    return "; ".join(titles), "\n\n".join(novels[t] for t in titles)


def split_text_file(text_file: str | os.PathLike) -> tuple[str, str]:
    """First ~10% of a text file (to a line end) for calibration, the rest for evaluation."""
    path = Path(text_file)
    if not path.is_file():
        raise ValueError(f"--text-file {str(path)!r} does not exist or is not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"--text-file {str(path)!r} is empty; give a plain-text file with enough text "
                         f"for calibration (first 10%) and evaluation (the rest)")
    cut = int(len(text) * TEXT_FILE_CALIBRATION_FRACTION)
    newline = text.find("\n", cut)
    cut = newline + 1 if newline != -1 else cut
    calib, evaluation = text[:cut], text[cut:]
    if not calib.strip() or not evaluation.strip():
        raise ValueError(f"--text-file {str(path)!r} is too short to split into calibration (first 10%) "
                         f"and evaluation text ({len(text)} characters)")
    return calib, evaluation


def _wikitext2() -> tuple[str, str]:
    try:
        import datasets  # noqa: PLC0415 - optional, online-only dependency
    except ImportError as e:
        raise SetupError("--source wikitext2 needs the `datasets` package (pip install datasets) and "
                         "network access on first use; offline, use the default Austen corpus "
                         "(--source austen) or --text-file") from e
    try:
        train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:  # datasets raises many types when offline (ConnectionError, OSError, ...)
        raise SetupError(f"could not load WikiText-2 through `datasets` ({type(e).__name__}: {e}); it "
                         f"needs network access on first use. Offline, use the default Austen corpus "
                         f"(--source austen) or --text-file") from e
    return "\n\n".join(train["text"]), "\n\n".join(test["text"])


def get_texts(source: str = "austen", text_file: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None) -> tuple[str, str, dict[str, str]]:
    """(calibration text, evaluation text, description) for a corpus source; ``text_file`` wins over ``source``.

    The description holds flat strings for result-row provenance: corpus, calibration, evaluation.
    """
    if text_file is not None:
        calib, evaluation = split_text_file(text_file)
        name = str(Path(text_file).resolve())
        return calib, evaluation, {"corpus": f"file:{name}",
                                   "calibration": "first 10% (to a line end)",
                                   "evaluation": "remaining 90%"}
    if source == "austen":
        novels = load_corpus("austen", cache_dir)
        split = default_split()
        calib = "\n\n".join(novels[t] for t in split["calibration"])
        evaluation = "\n\n".join(novels[t] for t in split["evaluation"])
        return calib, evaluation, {"corpus": "austen (Debian r-cran-janeaustenr)",
                                   "calibration": "; ".join(split["calibration"]),
                                   "evaluation": "; ".join(split["evaluation"])}
    if source == "wikitext2":
        calib, evaluation = _wikitext2()
        return calib, evaluation, {"corpus": "wikitext-2-raw-v1", "calibration": "train", "evaluation": "test"}
    raise ValueError(f"source={source!r} is not known; accepted: {', '.join(SOURCES)} "
                     f"(or pass text_file / --text-file)")


# A few tokenized texts, because calibration and evaluation re-tokenize the same novels at every
# sweep point and the calibration novels take seconds to tokenize on this CPU.
_TOKEN_CACHE: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
_TOKEN_CACHE_SIZE = 4


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids for ``text`` without special tokens (no BOS)."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           hashlib.sha1(text.encode("utf-8", errors="surrogatepass")).hexdigest())
    if key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(key)
        return _TOKEN_CACHE[key]
    # verbose=False: the whole text is longer than model_max_length on purpose; we cut windows.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    _TOKEN_CACHE[key] = tokens
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return tokens


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def calibration_batches(tokenizer, text: str, *, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(n_samples, seqlen) LongTensor of windows starting at seeded random token offsets (may overlap)."""
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("seqlen", seqlen)
    tokens = tokenize(tokenizer, text)
    if tokens.numel() < seqlen:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than seqlen={seqlen}; "
                         f"use seqlen <= {tokens.numel()} or a longer text")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_tokens(tokenizer, text: str, *, max_tokens: int | None = EVAL_MAX_TOKENS,
                seqlen: int = EVAL_SEQLEN) -> torch.Tensor:
    """(max_tokens // seqlen, seqlen) LongTensor of non-overlapping windows from the start of ``text``.

    ``max_tokens=None`` takes every full window. A remainder shorter than ``seqlen`` is dropped.
    """
    _check_positive_int("seqlen", seqlen)
    tokens = tokenize(tokenizer, text)
    available = tokens.numel() // seqlen
    if max_tokens is None:
        n_windows = available
    else:
        _check_positive_int("max_tokens", max_tokens)
        n_windows = max_tokens // seqlen
        if n_windows == 0:
            raise ValueError(f"max_tokens={max_tokens} is smaller than seqlen={seqlen}; "
                             f"use max_tokens >= {seqlen}")
    if n_windows == 0 or n_windows > available:
        raise ValueError(f"evaluation text has only {tokens.numel()} tokens ({available} full windows of "
                         f"seqlen={seqlen}), fewer than max_tokens={max_tokens}; pass max_tokens <= "
                         f"{available * seqlen} (or max_tokens=None for every full window), a smaller "
                         f"seqlen, or a longer text")
    return tokens[:n_windows * seqlen].view(n_windows, seqlen).clone()
