"""The tokenizer stored in a GGUF file, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

GGUF keeps a tokenizer as metadata: `tokenizer.ggml.model` (`gpt2` = byte-level BPE, `llama` =
SentencePiece BPE), the vocabulary `tokenizer.ggml.tokens` with a type per token (1 normal,
3 control, 4 user-defined, 6 byte), the BPE `merges` (gpt2) or per-token `scores` (llama),
`tokenizer.ggml.pre` naming the pre-tokenizer (how text is split before BPE), special token
ids, `add_bos_token`, and `tokenizer.chat_template` (Jinja). From these we build the
`tokenizer.json` pipeline the model was trained with:

- byte-level BPE: a pre-tokenizer by `tokenizer.ggml.pre` (GPT-2's regex; SmolLM/StarCoder's
  individual digits first; Llama 3's and Qwen2's split regexes), byte-level decoding;
- SentencePiece BPE: `▁` for spaces (prepended to the first word), byte fallback, merges
  recovered from the scores (a token's pieces merge with the priority of the token's score);
- control and user-defined tokens as added tokens, matched whole in the text.

`encode(text, add_bos=True)` adds BOS only when the model's tokenizer does (`add_bos_token`;
SmolLM2 does not). `apply_chat_template(messages)` renders the file's template with `jinja2` in
a sandbox, as transformers does. Unknown pre-tokenizer names fall back to GPT-2's regex, as
llama.cpp does.

References: Sennrich et al. 2016 (BPE); Radford et al. 2019 (GPT-2 byte-level BPE); Kudo &
Richardson 2018 (SentencePiece); llama.cpp `llama-vocab.cpp` (pre-tokenizer regexes by name) and
`gguf-py` (metadata keys); Hugging Face `tokenizers` and transformers `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sim.core.errors import ConfigError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 3, 4, 6

# pre-tokenizer splits by GGUF `tokenizer.ggml.pre`; any other value gets ByteLevel's own
# (GPT-2) split
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
          "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("a GGUF tokenizer needs the 'tokenizers' package: pip install "
                          "'infersim[real]'") from exc
    return tokenizers


def _byte_level(pre: str | None) -> tuple[Any, Any]:
    """(pre-tokenizer, decoder) of a byte-level BPE vocabulary with pre-tokenizer name `pre`."""
    tk = _tokenizers()
    pt = tk.pre_tokenizers
    if pre in DIGITS_FIRST:  # every digit its own word, then GPT-2's split
        pre_tok = pt.Sequence([pt.Digits(individual_digits=True),
                               pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in SPLITS:
        pre_tok = pt.Sequence([pt.Split(tk.Regex(SPLITS[pre]), behavior="isolated"),
                               pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        pre_tok = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tok, tk.decoders.ByteLevel()


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]
                ) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    vocabulary pieces, best (highest-scoring) merged token first, then by the pieces' ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind != TOKEN_NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


class GGUFTokenizer:
    """A GGUF file's tokenizer with the `sim.model.tokenizer.Tokenizer` interface, plus chat."""

    def __init__(self, meta: dict[str, Any], where: str = "GGUF file") -> None:
        tk = _tokenizers()
        self.where = where
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ConfigError(f"{where}: no tokenizer.ggml.tokens in the metadata")
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
            model = tk.models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False)
            self._tok = tk.Tokenizer(model)
            self._tok.pre_tokenizer, self._tok.decoder = _byte_level(meta.get("tokenizer.ggml.pre"))
            default_add_bos = False
        elif kind == "llama":
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            unk_id = meta.get("tokenizer.ggml.unknown_token_id")
            model = tk.models.BPE(vocab, _spm_merges(tokens, scores, types), fuse_unk=True,
                                  byte_fallback=True,
                                  unk_token=tokens[unk_id] if unk_id is not None else None)
            self._tok = tk.Tokenizer(model)
            self._tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first", split=False)
            d = tk.decoders
            self._tok.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(),
                                            d.Strip(" ", 1, 0)])
            default_add_bos = True
        else:
            raise ConfigError(f"{where}: tokenizer model {kind!r} is not supported (gpt2 "
                              "byte-level BPE and llama SentencePiece are); pass "
                              "{'prompt_token_ids': [...]} prompts instead")
        added = [tk.AddedToken(t, special=k == TOKEN_CONTROL, normalized=False)
                 for t, k in zip(tokens, types, strict=True)
                 if k in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        if added:
            self._tok.add_tokens(added)
        self.vocab_size = len(tokens)
        self.tokens = tokens
        self.bos_token_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos
                                                                  if e is not None))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        self.add_bos_token = default_add_bos if add_bos is None else bool(add_bos)
        self.chat_template: str | None = meta.get("tokenizer.chat_template")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` and the model's tokenizer adds one."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self.add_bos_token and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        return self.tokens[int(token_id)]

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None) -> str | list[int]:
        """The conversation as the model's prompt text (or ids with `tokenize=True`)."""
        template = chat_template or self.chat_template
        if not template:
            raise ConfigError(f"{self.where}: has no tokenizer.chat_template; pass "
                              "chat_template=... or use generate() with a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ConfigError(f"a chat message must be a dict with 'role' and 'content', "
                                  f"got {m!r}")
        text = render_chat_template(template, list(messages), add_generation_prompt,
                                    self._special_text(self.bos_token_id),
                                    self._special_text(self.eos_token_id))
        return self.encode(text, add_bos=False) if tokenize else text

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokens[token_id]


def render_chat_template(template: str, messages: list[dict[str, Any]],
                         add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
    """Render a Hugging Face chat template (Jinja) in a sandbox, with transformers' settings."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ConfigError("chat templates need the 'jinja2' package: pip install "
                          "'infersim[real]'") from exc

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise ConfigError(f"chat template failed to render: {exc}") from exc
