"""Tokenizers: UTF-8 bytes for tiny proxies, Hugging Face `tokenizer.json` for real checkpoints.

`ByteTokenizer` maps text to its UTF-8 bytes (ids 0..255) plus two specials, BOS (256) and
EOS (257): it needs no files, covers every string, and gives the tiny proxy models a 258-token
vocabulary. `HFTokenizer` wraps the `tokenizers` library's `Tokenizer.from_file` with the same
small interface; its BOS/EOS ids come from `tokenizer_config.json` when it names them, else
from the model config. Both add BOS themselves (never the tokenizer's post-processor) so that
`encode(text, add_bos=True)` means the same thing for both.

A real checkpoint is never silently paired with the byte tokenizer: a folder without
`tokenizer.json` is refused (its 32k-token model would be fed byte ids 0..257, which are not its
tokens), unless the caller opts in with `tokenizer="byte"` (`EngineArgs(tokenizer="byte")`,
`--tokenizer byte`). `tokenizer=PATH` takes the tokenizer from another folder (or a
`tokenizer.json` file), as vLLM's `--tokenizer` does. A tokenizer with more tokens than the
model's vocabulary is refused too: it is not this model's tokenizer.

References: Xue et al. 2022 (ByT5: byte-level models); Hugging Face `tokenizers`
(tokenizer.json) and transformers `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256 is BOS, 257 is EOS.

    A checkpoint without tokenizer.json may have a larger vocabulary: ids past 257 decode to a
    visible `<|id|>` placeholder rather than failing a whole run.
    """

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    special_text: ClassVar[dict[int, str]] = {256: "<s>", 257: "</s>"}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. half a multi-byte character) becomes U+FFFD."""
        parts: list[str] = []
        run = bytearray()
        for token in ids:
            t = int(token)
            if 0 <= t < 256:
                run.append(t)
                continue
            if t < 0:
                raise ConfigError(f"token ids must be non-negative, got {t}")
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if t not in self.special_text:  # a model with a larger vocabulary than bytes
                parts.append(f"<|{t}|>")
            elif not skip_special_tokens:
                parts.append(self.special_text[t])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, with BOS/EOS from tokenizer_config.json or the config."""

    def __init__(self, folder: str | Path, config: ModelConfig | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(f"{folder}: has {TOKENIZER_FILE} but the 'tokenizers' package is "
                              "missing; pip install infersim[tokenizers]") from exc
        self.folder = Path(folder)
        path = self.folder / TOKENIZER_FILE
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            raise ConfigError(f"{path}: cannot load tokenizer: {exc}") from exc
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        special = self._special_tokens()
        bos = self._token_id(special.get("bos_token"))
        eos = self._token_id(special.get("eos_token"))
        self.bos_token_id: int | None = bos if bos is not None else (
            config.bos_token_id if config else None)
        config_eos = tuple(config.eos_token_ids) if config else ()
        if eos is not None:
            self.eos_token_ids: tuple[int, ...] = (eos, *[e for e in config_eos if e != eos])
        else:
            self.eos_token_ids = config_eos
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None

    def _special_tokens(self) -> dict[str, Any]:
        path = self.folder / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))


#: `tokenizer=` value that opts a checkpoint without tokenizer.json into the byte tokenizer
BYTE_TOKENIZER = "byte"


def check_vocab(tokenizer: ByteTokenizer | HFTokenizer, config: ModelConfig | None,
                where: str) -> None:
    """Refuse a tokenizer whose ids would run past the model's embedding table."""
    if config is not None and tokenizer.vocab_size > config.n_vocab:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"model's vocabulary (vocab_size) is {config.n_vocab}: it is not this "
                          "model's tokenizer; pass the model's own with tokenizer=PATH")


def load_tokenizer(folder: str | Path | None, config: ModelConfig | None = None,
                   tokenizer: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of checkpoint `folder` (see the module doc for `tokenizer=`).

    `tokenizer=None`: `folder`'s tokenizer.json, refused when it has none (`folder=None`, no
    checkpoint at all, gives the byte tokenizer); `"byte"`: the byte tokenizer; a path: the
    tokenizer.json there.
    """
    if tokenizer is not None and str(tokenizer) == BYTE_TOKENIZER:
        return ByteTokenizer()
    if tokenizer is not None:
        path = Path(str(tokenizer)).expanduser()
        source = path.parent if path.name == TOKENIZER_FILE else path
        if not (source / TOKENIZER_FILE).is_file():
            raise ConfigError(f"tokenizer={str(tokenizer)!r}: no {TOKENIZER_FILE} there; pass a "
                              f"folder holding {TOKENIZER_FILE}, the file itself, or "
                              f"{BYTE_TOKENIZER!r} for the byte tokenizer")
        tok = HFTokenizer(source, config)
        check_vocab(tok, config, str(source / TOKENIZER_FILE))
        return tok
    if folder is None:
        return ByteTokenizer()
    if not (Path(folder) / TOKENIZER_FILE).is_file():
        vocab = f"its {config.n_vocab}-token vocabulary" if config is not None else "its vocabulary"
        raise ConfigError(
            f"{folder}: no {TOKENIZER_FILE}: the byte tokenizer's ids 0..257 are not the tokens "
            f"of {vocab}, so text would be silently mistranslated. Copy the model's "
            f"{TOKENIZER_FILE} into the folder, pass tokenizer=PATH (--tokenizer PATH), or opt "
            f"in to byte ids with tokenizer={BYTE_TOKENIZER!r} (--tokenizer {BYTE_TOKENIZER})")
    tok = HFTokenizer(folder, config)
    check_vocab(tok, config, str(Path(folder) / TOKENIZER_FILE))
    return tok
