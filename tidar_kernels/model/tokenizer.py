"""The tokenizer wrapper every model source shares: a ``tokenizers`` tokenizer plus the EOS and mask ids."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the end-of-text and mask token ids.

    Text is encoded with special tokens taken literally (``encode_special_tokens``):
    a file that contains the string ``<|mask|>`` must not put the mask id into
    the clean half, nor ``<|endoftext|>`` a fake document boundary.
    """

    def __init__(self, tokenizer, eos_token: str = EOS_TOKEN, mask_token: str = MASK_TOKEN, require_eos: bool = True):
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_token, self.mask_token = eos_token, mask_token
        self.eos_id = tokenizer.token_to_id(eos_token)
        self.mask_id = tokenizer.token_to_id(mask_token)
        if self.eos_id is None and require_eos:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        if self.mask_id is None:
            raise ValueError(f"mask_token {mask_token!r} is not in the tokenizer's vocabulary: TiDAR needs a "
                             "dedicated mask token (add it, never reuse end-of-text or padding)")
        if self.mask_id == self.eos_id:
            raise ValueError(f"mask_token must differ from eos_token, both are id {self.eos_id}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_tidar.json`` (which tokens are EOS and mask)."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_tidar.json").write_text(
            json.dumps({"eos_token": self.eos_token, "mask_token": self.mask_token}, indent=1))

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_token: str = EOS_TOKEN, mask_token: str = MASK_TOKEN,
                       require_eos: bool = True) -> "TextTokenizer":
        """Wrap a checkpoint's ``tokenizers.Tokenizer``, adding ``mask_token`` when it is missing.

        The added token takes the next free id (the tokenizer's size), which is
        the id :func:`tidar_kernels.checkpoints.add_mask_token` gives the model's
        new mask row; the trainer checks the two agree.
        """
        from tokenizers import AddedToken

        if tokenizer.token_to_id(mask_token) is None:
            tokenizer.add_special_tokens([AddedToken(mask_token, special=True)])
        return cls(tokenizer, eos_token, mask_token, require_eos)

    @classmethod
    def load(cls, directory: str | os.PathLike, require_eos: bool = True) -> "TextTokenizer":
        """Load ``tokenizer.json`` from a directory saved by :meth:`save` or a Hugging Face model directory.

        The EOS / mask token names come from ``tokenizer_tidar.json`` (ours), else
        ``tokenizer_config.json``'s ``eos_token`` (Hugging Face) and
        :data:`MASK_TOKEN`, added when missing (:meth:`from_tokenizer`).
        """
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer directory {str(directory)!r} must hold tokenizer.json, it does not")
        names = {"eos_token": EOS_TOKEN, "mask_token": MASK_TOKEN}
        if (directory / "tokenizer_tidar.json").is_file():
            names.update(json.loads((directory / "tokenizer_tidar.json").read_text()))
        elif (directory / "tokenizer_config.json").is_file():
            eos = json.loads((directory / "tokenizer_config.json").read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names["eos_token"] = eos
        return cls.from_tokenizer(Tokenizer.from_file(str(path)), names["eos_token"], names["mask_token"], require_eos)
