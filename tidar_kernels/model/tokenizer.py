"""The tokenizer wrapper every model source shares: a ``tokenizers`` tokenizer plus the EOS and mask ids."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the end-of-text and mask token ids.

    Text is encoded with special tokens taken literally (``encode_special_tokens``):
    a file that contains the string ``<|mask|>`` must not put the mask id into
    the clean half, nor ``<|endoftext|>`` a fake document boundary.

    ``stop_ids``: every id that ends generation (default ``eos_id`` alone, if any);
    ``pad_id``: the checkpoint's padding id, None when it names none.
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
        self.stop_ids: list[int] = [] if self.eos_id is None else [self.eos_id]
        self.pad_id: Optional[int] = None

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
    def from_ids(cls, tokenizer, stop_ids: Sequence[int], mask_id: int,
                 pad_id: Optional[int] = None) -> "TextTokenizer":
        """Wrap a tokenizer whose mask and EOS ids a checkpoint's config gives (ordinary vocabulary rows).

        The token strings are whatever the tokenizer has at those ids; ``stop_ids[0]``
        is ``eos_id``. Nothing is added to the tokenizer.
        """
        stop_ids = list(stop_ids)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        named = {"mask_id": [mask_id], "stop_ids": stop_ids, "pad_id": [] if pad_id is None else [pad_id]}
        for name, ids in named.items():
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or tokenizer.id_to_token(i) is None:
                    raise ValueError(f"{name} must be ids of the tokenizer ({size} tokens), got {ids!r}")
        if not stop_ids:
            raise ValueError("stop_ids must name at least one end-of-text id, got none")
        wrapped = cls(tokenizer, tokenizer.id_to_token(stop_ids[0]), tokenizer.id_to_token(mask_id))
        if (wrapped.eos_id, wrapped.mask_id) != (stop_ids[0], mask_id):
            raise ValueError(f"the tokenizer's strings for ids {stop_ids[0]} (eos) and {mask_id} (mask) map back to "
                             f"ids {wrapped.eos_id} and {wrapped.mask_id}: duplicate token strings")
        if mask_id in stop_ids:
            raise ValueError(f"mask_id must not be a stop id, got mask_id {mask_id} in stop_ids {stop_ids}")
        wrapped.stop_ids, wrapped.pad_id = stop_ids, pad_id
        return wrapped

    @classmethod
    def load(cls, directory: str | os.PathLike, require_eos: bool = True, stop_ids: Optional[Sequence[int]] = None,
             mask_id: Optional[int] = None, pad_id: Optional[int] = None) -> "TextTokenizer":
        """Load ``tokenizer.json`` from a directory saved by :meth:`save` or a Hugging Face model directory.

        With ``mask_id`` (a checkpoint whose config gives its mask and EOS ids, e.g.
        a diffusion checkpoint) the ids are used as they are (:meth:`from_ids`).
        Otherwise the EOS / mask token names come from ``tokenizer_tidar.json``
        (ours), else ``tokenizer_config.json``'s ``eos_token`` (Hugging Face) and
        :data:`MASK_TOKEN`, added when missing (:meth:`from_tokenizer`).
        """
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer directory {str(directory)!r} must hold tokenizer.json, it does not")
        if mask_id is not None:
            return cls.from_ids(Tokenizer.from_file(str(path)), stop_ids or [], mask_id, pad_id)
        names = {"eos_token": EOS_TOKEN, "mask_token": MASK_TOKEN}
        if (directory / "tokenizer_tidar.json").is_file():
            names.update(json.loads((directory / "tokenizer_tidar.json").read_text()))
        elif (directory / "tokenizer_config.json").is_file():
            eos = json.loads((directory / "tokenizer_config.json").read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names["eos_token"] = eos
        return cls.from_tokenizer(Tokenizer.from_file(str(path)), names["eos_token"], names["mask_token"], require_eos)
