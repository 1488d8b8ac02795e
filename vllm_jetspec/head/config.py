"""Configuration of a causal DFlash-format draft head (JetSpec head format).

The on-disk form is the ``config.json`` that vLLM 0.26 loads as
``DFlashDraftModel`` (``vllm/model_executor/models/qwen3_dflash.py``):
a Qwen3 config (``model_type: "qwen3"``) plus ``dflash_config``. vLLM wraps
it in ``EAGLEConfig`` and reads, besides the Qwen3 sizes:

- ``dflash_config.mask_token_id``: the token id fed to the mask slots;
- ``dflash_config.target_layer_ids``: which target layers feed ``fc``. vLLM
  adds 1 to each id (``GPUModelRunner._get_eagle3_aux_layers_from_config``):
  id ``i`` is the output of target layer ``i`` (0-based), i.e. the residual
  stream *before* layer ``i + 1``. ``-1`` is the embedding output;
- ``dflash_config.causal``: ``true`` makes every draft layer causal within
  the block; without it vLLM runs non-causal blocks.

``block_size`` is not read by vLLM (``num_speculative_tokens`` sets the draft
length); it is stored for training and for the tree proposer.

Published JetSpec heads (hao-ai-lab/JetSpec, ``jetspec/models/draft_head.py``)
are saved by JetSpec's own loader, which reads a different dialect of the same
file: causality is ``dflash_config.causal_head`` (default false), ``block_size``
and ``num_target_layers`` are top-level keys, ``target_layer_ids`` may be
absent (then derived from ``num_target_layers`` and the head's layer count,
``derive_target_layer_ids``) and ``dflash_config.target_hidden_size`` may be
present. ``HeadConfig.from_dict`` reads both dialects; ``to_dict`` writes
ours, which vLLM runs as the author meant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ARCHITECTURE = "DFlashDraftModel"
MODEL_TYPE = "qwen3"
CONFIG_NAME = "config.json"

# Keys of config.json that this dataclass owns; everything else is kept in
# ``extra`` on load and written back unchanged.
_DFLASH_KEYS = ("mask_token_id", "target_layer_ids", "causal", "block_size")


def _as_dict(cfg: Any) -> dict:
    """A target's config as a plain dict: a transformers config, a dict, or a
    path to a model directory / config.json."""
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        with open(path) as f:
            return json.load(f)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"cannot read a model config from {type(cfg).__name__}")


def _rope_theta(d: Mapping) -> float | None:
    """rope theta from a transformers-5 ``rope_parameters`` or an older
    top-level ``rope_theta``."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if d.get("rope_theta") is not None:
        return float(d["rope_theta"])
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def derive_target_layer_ids(num_target_layers: int,
                            num_layers: int) -> list[int]:
    """The target layers a JetSpec head reads when its config names none:
    JetSpec's ``build_target_layer_ids`` rule (hao-ai-lab/JetSpec,
    ``jetspec/models/draft_head.py``): one head layer reads the middle
    target layer (``num_target_layers // 2``); ``n`` > 1 head layers read
    ``n`` layers spread evenly from 1 to ``num_target_layers - 3``, each
    rounded with Python's ``round`` (halves to even). Qwen3-8B (36 layers)
    with a 5-layer head: [1, 9, 17, 25, 33]."""
    if num_layers == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    return [round(first + k * (last - first) / (num_layers - 1))
            for k in range(num_layers)]


def _causality(dflash: Mapping) -> bool:
    """A head's block attention: ``dflash_config.causal`` (vLLM 0.26's key,
    ours) or ``causal_head`` (JetSpec's); both loaders default to
    bidirectional (non-causal) for full-attention layers."""
    vals = {k: dflash[k] for k in ("causal", "causal_head")
            if dflash.get(k) is not None}
    for k, v in vals.items():
        if not isinstance(v, bool):
            raise ValueError(f"DFlash head config: dflash_config.{k} must be "
                             f"true or false, got {v!r}")
    if len(set(vals.values())) > 1:
        raise ValueError(f"DFlash head config: dflash_config.causal "
                         f"({vals['causal']}) and dflash_config.causal_head "
                         f"({vals['causal_head']}) disagree")
    return next(iter(vals.values()), False)


def _one_of(top: Mapping, dflash: Mapping, key: str) -> Any:
    """``key`` from the top level (JetSpec) or ``dflash_config`` (ours);
    both present must agree."""
    vals = [v for v in (top.get(key), dflash.get(key)) if v is not None]
    for v in vals:
        if not _is_int(v) or v < 1:
            raise ValueError(f"DFlash head config: {key} must be a positive "
                             f"integer, got {v!r}")
    if len(set(vals)) > 1:
        raise ValueError(f"DFlash head config: {key} {vals[0]} (top level) "
                         f"and dflash_config.{key} {vals[1]} disagree")
    return vals[0] if vals else None


@dataclass
class HeadConfig:
    """The fields of a DFlash head's config.json that change its math.

    ``hidden_size``, ``vocab_size`` and the attention geometry follow the
    target: the head borrows the target's embedding and LM head, and its
    ``fc`` reads ``len(target_layer_ids)`` target hidden states.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    # dflash_config
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 16
    causal: bool = True
    # Qwen3 details
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    # Number of layers of the target the head was made for (z-lab DFlash
    # configs carry it too); 0 when unknown. Used only for checks.
    num_target_layers: int = 0
    # Other config.json keys, preserved across from_json/to_json.
    extra: dict = field(default_factory=dict, repr=False)
    # How the file was read (for start-up logs): ids derived from
    # num_target_layers; "jetspec" (dflash_config.causal_head or no
    # causality key) or "vllm" (dflash_config.causal) dialect.
    layer_ids_derived: bool = field(default=False, compare=False, repr=False)
    dialect: str = field(default="vllm", compare=False, repr=False)

    def __post_init__(self) -> None:
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        ids = self.target_layer_ids
        if not ids:
            raise ValueError("HeadConfig: target_layer_ids must not be empty")
        if sorted(set(ids)) != ids:
            # vLLM collects aux hidden states in layer order and drops
            # duplicates (`layer_idx in aux_hidden_state_layers`), so any
            # other order would feed fc a different concatenation.
            raise ValueError(
                f"HeadConfig: target_layer_ids must be strictly increasing "
                f"(vLLM concatenates target layers in layer order), got {ids}")
        if ids[0] < -1:
            raise ValueError(f"HeadConfig: target_layer_ids must be >= -1, "
                             f"got {ids}")
        if self.num_target_layers and ids[-1] >= self.num_target_layers:
            raise ValueError(
                f"HeadConfig: target_layer_ids {ids} reference layers beyond "
                f"the target's {self.num_target_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"HeadConfig: num_attention_heads ({self.num_attention_heads})"
                f" must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"HeadConfig: head_dim must be even (RoPE), "
                             f"got {self.head_dim}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"HeadConfig: mask_token_id {self.mask_token_id} is outside "
                f"the vocabulary [0, {self.vocab_size})")
        if self.block_size < 2:
            raise ValueError(f"HeadConfig: block_size must be >= 2 (anchor + "
                             f"at least one mask slot), got {self.block_size}")
        if self.hidden_act != "silu":
            raise ValueError(f"HeadConfig: only hidden_act='silu' is "
                             f"supported, got {self.hidden_act!r}")

    @property
    def num_target_features(self) -> int:
        """Width of fc's input: the concatenated target hidden states."""
        return self.hidden_size * len(self.target_layer_ids)

    @property
    def aux_layer_ids(self) -> list[int]:
        """vLLM's aux hidden-state indices (``target_layer_ids`` + 1): index
        ``j`` is the residual stream entering target layer ``j`` (``j`` = 0:
        the embeddings; ``j`` = num layers: the last layer's output before
        the final norm). For j < num layers this is HF's
        ``output_hidden_states[j]``; HF's last entry is after the final
        norm, so it is *not* aux ``num layers``."""
        return [i + 1 for i in self.target_layer_ids]

    # ------------------------------------------------------------ derivation
    @classmethod
    def for_target(
        cls,
        target_hf_config: Any,
        num_layers: int,
        target_layer_ids: list[int],
        block_size: int = 16,
        mask_token_id: int | None = None,
        intermediate_size: int | None = None,
    ) -> HeadConfig:
        """A head for ``target_hf_config`` (a transformers config, dict, or
        model directory) with ``num_layers`` Qwen3 decoder layers.

        Hidden size, vocabulary, attention geometry, norm eps, rope theta and
        max positions are the target's (Llama targets such as SmolLM2 work:
        only the numbers are taken; the head's RoPE is always the default,
        unscaled one). ``intermediate_size`` defaults to the target's. ``mask_token_id`` defaults to the last
        vocabulary id: any fixed id works, its (frozen) embedding only marks
        the slots; pass a reserved/unused token id where the target has one.
        """
        t = _as_dict(target_hf_config)
        if "text_config" in t and "hidden_size" not in t:
            t = dict(t["text_config"])
        missing = [k for k in ("hidden_size", "num_attention_heads",
                               "num_hidden_layers", "vocab_size")
                   if t.get(k) is None]
        if missing:
            raise ValueError(f"target config lacks {missing}")
        hidden = int(t["hidden_size"])
        n_heads = int(t["num_attention_heads"])
        n_kv = int(t.get("num_key_value_heads") or n_heads)
        head_dim = int(t.get("head_dim") or hidden // n_heads)
        n_target = int(t["num_hidden_layers"])
        ids = [int(i) for i in target_layer_ids]
        bad = [i for i in ids if not -1 <= i < n_target]
        if bad:
            raise ValueError(
                f"target_layer_ids {bad} do not exist in the target "
                f"({n_target} layers; valid ids are -1..{n_target - 1}, "
                f"vLLM reads aux hidden state id+1)")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        vocab = int(t["vocab_size"])
        act = t.get("hidden_act") or t.get("hidden_activation") or "silu"
        if act != "silu":
            act = "silu"  # the head is Qwen3 whatever the target's MLP is
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(num_layers),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(intermediate_size
                                  or t.get("intermediate_size") or 4 * hidden),
            vocab_size=vocab,
            target_layer_ids=ids,
            mask_token_id=vocab - 1 if mask_token_id is None
            else int(mask_token_id),
            block_size=int(block_size),
            causal=True,
            rms_norm_eps=float(t.get("rms_norm_eps") or 1e-6),
            rope_theta=_rope_theta(t) or 1_000_000.0,
            max_position_embeddings=int(t.get("max_position_embeddings")
                                        or 32768),
            num_target_layers=n_target,
        )

    def check_target(self, target_hf_config: Any) -> None:
        """Raise ``ValueError`` when this head cannot run on the target."""
        t = _as_dict(target_hf_config)
        if "text_config" in t and "hidden_size" not in t:
            t = dict(t["text_config"])
        problems = []
        if int(t.get("hidden_size", -1)) != self.hidden_size:
            problems.append(
                f"hidden_size: head {self.hidden_size} != target "
                f"{t.get('hidden_size')} (the head borrows the target's "
                f"embedding and LM head and its fc reads target hidden "
                f"states, so they must be equal)")
        if int(t.get("vocab_size", -1)) != self.vocab_size:
            problems.append(f"vocab_size: head {self.vocab_size} != target "
                            f"{t.get('vocab_size')}")
        n_target = t.get("num_hidden_layers")
        if n_target is not None and self.num_target_layers \
                and self.num_target_layers != n_target:
            problems.append(
                f"num_target_layers: head made for a "
                f"{self.num_target_layers}-layer target, this target has "
                f"{n_target} layers")
        elif n_target is not None and self.target_layer_ids[-1] >= n_target:
            problems.append(
                f"target_layer_ids {self.target_layer_ids} reference layers "
                f"the {n_target}-layer target does not have")
        if problems:
            raise ValueError("DFlash head does not fit the target: "
                             + "; ".join(problems))

    # --------------------------------------------------------- (de)serialise
    def to_dict(self, dtype: str | None = None) -> dict:
        """The config.json vLLM 0.26 loads as ``DFlashDraftModel``."""
        d = dict(self.extra)
        d.update({
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default",
                                "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "causal": self.causal,
                "block_size": self.block_size,
            },
        })
        if dtype is not None:
            d["dtype"] = dtype
        return d

    def to_json(self, path: str | os.PathLike | None = None,
                dtype: str | None = None) -> str:
        """JSON text; written to ``path`` (a directory or a file) if given."""
        text = json.dumps(self.to_dict(dtype), indent=2, sort_keys=True) + "\n"
        if path is not None:
            path = os.fspath(path)
            if os.path.isdir(path):
                path = os.path.join(path, CONFIG_NAME)
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadConfig:
        """From a config.json dict in our dialect or JetSpec's (module
        docstring). Raises ``ValueError`` with one line naming the key."""
        d = dict(d)
        archs = d.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise ValueError(f"not a DFlash head config: architectures="
                             f"{archs}, expected [{ARCHITECTURE!r}]")
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"DFlash head config has model_type "
                             f"{d.get('model_type')!r}, expected 'qwen3'")
        dflash = d.get("dflash_config") or {}
        if not isinstance(dflash, Mapping):
            raise ValueError(f"DFlash head config: dflash_config must be an "
                             f"object, got {type(dflash).__name__}")
        dflash = dict(dflash)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "vocab_size"):
            if not _is_int(d.get(key)):
                raise ValueError(f"DFlash head config: {key} must be an "
                                 f"integer, got {d.get(key)!r}")
        if dflash.get("mask_token_id") is None:
            # JetSpec's loader defaults it to None; vLLM feeds this id to
            # the mask slots and refuses a head without it.
            raise ValueError("DFlash head config lacks "
                             "dflash_config.mask_token_id (the token id fed "
                             "to the mask slots)")
        if not _is_int(dflash["mask_token_id"]):
            raise ValueError(f"DFlash head config: dflash_config."
                             f"mask_token_id must be an integer, got "
                             f"{dflash['mask_token_id']!r}")
        if d.get("attention_bias"):
            raise ValueError("attention_bias heads are not supported")
        if dflash.get("use_aux_hidden_state", True) is not True:
            raise ValueError("heads without fc (use_aux_hidden_state: false) "
                             "are not supported")
        hidden = int(d["hidden_size"])
        for where, src in (("", d), ("dflash_config.", dflash)):
            ths = src.get("target_hidden_size")
            if ths is not None and ths != hidden:
                # JetSpec then inserts a randomly initialised projection
                # (HiddenDimAdapter, a smoke-test device): nothing trained.
                raise ValueError(
                    f"DFlash head config: {where}target_hidden_size {ths} != "
                    f"hidden_size {hidden}: a head whose target has another "
                    f"hidden size is not supported (the head reads the "
                    f"target's hidden states and borrows its embedding and "
                    f"LM head)")
        if d.get("draft_vocab_size") not in (None, d["vocab_size"]):
            raise ValueError(f"DFlash head config: draft_vocab_size "
                             f"{d['draft_vocab_size']} != vocab_size "
                             f"{d['vocab_size']} is not supported (the head "
                             f"shares the target's vocabulary)")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is supported, got {rope}")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError("sliding-window DFlash layers are not supported")
        causal = _causality(dflash)
        block = _one_of(d, dflash, "block_size")
        if block is None:
            block = 16
        n_target = d.get("num_target_layers") or 0
        if not _is_int(n_target) or n_target < 0:
            raise ValueError(f"DFlash head config: num_target_layers must be "
                             f"a non-negative integer, got {n_target!r}")
        n_layers = int(d["num_hidden_layers"])
        ids = dflash.get("target_layer_ids")
        derived = ids is None
        if derived:
            if not n_target:
                raise ValueError(
                    "DFlash head config lacks dflash_config.target_layer_ids "
                    "and num_target_layers (the ids are derived from it when "
                    "absent)")
            ids = derive_target_layer_ids(n_target, n_layers)
        elif not (isinstance(ids, (list, tuple))
                  and all(_is_int(i) for i in ids)):
            raise ValueError(f"DFlash head config: dflash_config."
                             f"target_layer_ids must be a list of integers, "
                             f"got {ids!r}")
        n_heads = int(d["num_attention_heads"])
        owned = {"architectures", "model_type", "hidden_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size",
                 "vocab_size", "hidden_act", "rms_norm_eps",
                 "rope_parameters", "rope_theta", "max_position_embeddings",
                 "attention_bias", "tie_word_embeddings", "use_sliding_window",
                 "sliding_window", "layer_types", "block_size",
                 "num_target_layers", "dflash_config", "dtype", "torch_dtype",
                 "target_hidden_size"}
        extra = {k: v for k, v in d.items() if k not in owned}
        return cls(
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or hidden // n_heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            target_layer_ids=list(ids),
            mask_token_id=int(dflash["mask_token_id"]),
            block_size=int(block),
            causal=causal,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            # vLLM's default when the checkpoint gives none
            # (set_default_rope_theta in DFlashQwen3DecoderLayer).
            rope_theta=_rope_theta(d) or 1_000_000.0,
            max_position_embeddings=int(d.get("max_position_embeddings")
                                        or 32768),
            hidden_act=d.get("hidden_act", "silu"),
            num_target_layers=int(n_target),
            extra=extra,
            layer_ids_derived=derived,
            dialect="jetspec" if "causal_head" in dflash
            or "causal" not in dflash else "vllm",
        )

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> HeadConfig:
        """From a head directory, a config.json path, or JSON text."""
        s = os.fspath(path_or_text)
        if s.lstrip().startswith("{"):
            return cls.from_dict(json.loads(s))
        if os.path.isdir(s):
            s = os.path.join(s, CONFIG_NAME)
        with open(s) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes: Any) -> HeadConfig:
        d = asdict(self)
        d.update(changes)
        return HeadConfig(**d)
