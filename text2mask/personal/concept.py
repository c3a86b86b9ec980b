"""Personalized concepts: what Custom Diffusion and textual inversion training leave
behind, applied to a loaded Stable Diffusion exactly.

A concept = new token(s) with their embedding row(s) and, for Custom Diffusion, the
cross-attention (``attn2``) projections of every transformer block: K and V, and with
``freeze_model=crossattn`` also Q and the output projection. Applying one writes these
tensors into the model's own weights (SD v1's K/V have no bias, so the merged attention
is exactly diffusers' ``CustomDiffusionAttnProcessor``) and restores the originals
bitwise on exit. ``UNet2DConditionModel.load_attn_procs`` is not used: in current
diffusers it builds the processors but installs them only when given ``_pipeline``.

Folder formats (checked in this order):
    A  diffusers train_custom_diffusion.py: pytorch_custom_diffusion_weights.safetensors|.bin
       with ``<processor>.to_{k,v,q}_custom_diffusion.weight`` / ``to_out_custom_diffusion.0.*``
       (``{}`` for attn1 processors in the .bin), plus ``<token>.safetensors|.bin`` = {token: (dim,)}
    B  Custom Diffusion's diffusers script: delta.bin = {"unet": {"<module>.attn2.to_k.weight": …},
       "modifier_token": {token: (dim,)}}
    C  Custom Diffusion's CompVis script: delta*.ckpt = {"state_dict": {"model.diffusion_model.
       <block>…attn2.to_k.weight": …, "embed": (n, dim)}}; tokens <new1>, <new2>, … unless
       concept.json names them
    T  textual inversion (token only): learned_embeds.safetensors|.bin = {token: (n, dim)};
       n > 1 adds token, token_1, … as diffusers does
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .. import guard
from ..errors import InputError
from ..guard import safe_name
from ..io import write_json

WEIGHTS_A = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
DELTA_B = "delta.bin"
EMBEDS_T = ("learned_embeds.safetensors", "learned_embeds.bin")
CONCEPT_JSON = "concept.json"
TOKEN_SEPARATOR = "#"   # folder#token: one concept of a multi-concept folder
KV_PARAMS = ("to_k.weight", "to_v.weight")
Q_OUT_PARAMS = ("to_q.weight", "to_out.0.weight", "to_out.0.bias")
_A_SUFFIX = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
             "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
             "to_out_custom_diffusion.0.bias": "to_out.0.bias"}
_COMPVIS_PREFIX = "model.diffusion_model."
# CompVis SD v1 UNet: the SpatialTransformer of these blocks -> diffusers attentions.
_COMPVIS_INPUT = {1: (0, 0), 2: (0, 1), 4: (1, 0), 5: (1, 1), 7: (2, 0), 8: (2, 1)}


def _is_safetensors(path: Path) -> bool:
    """By content, not suffix: diffusers' Custom Diffusion script has saved safetensors
    token files under a ``.bin`` name. A safetensors file starts with an 8-byte header
    length and a JSON object; torch.save files with a zip ("PK") or pickle (0x80) mark."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return path.suffix == ".safetensors"
    return len(head) == 9 and head[8:9] == b"{"


def _read(path: Path) -> dict:
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch / safetensors raise many types for a bad file
        raise InputError(f"{path}: cannot read concept file ({type(e).__name__}: {e})") from None


def _read_info(path: Path) -> dict:
    """concept.json (optional), schema-checked: an object; ``tokens`` a list of strings,
    ``class`` a string when present."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object")
    tokens = info.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise InputError(f"{path}: field 'tokens' must be a non-empty list of token strings")
    if "class" in info and not isinstance(info["class"], str):
        raise InputError(f"{path}: field 'class' must be a string")
    return info


def compvis_to_diffusers(key: str) -> str:
    """``input_blocks.1.1.transformer_blocks…`` -> ``down_blocks.0.attentions.0.transformer_blocks…``."""
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d*)\.(transformer_blocks\..+)", key)
    if m is None:
        raise KeyError(key)
    kind, a, b, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block" and a == 1:
        return f"mid_block.attentions.0.{rest}"
    if b != "1":
        raise KeyError(key)
    if kind == "input_blocks" and a in _COMPVIS_INPUT:
        down, att = _COMPVIS_INPUT[a]
        return f"down_blocks.{down}.attentions.{att}.{rest}"
    if kind == "output_blocks" and 3 <= a <= 11:
        return f"up_blocks.{a // 3}.attentions.{a % 3}.{rest}"
    raise KeyError(key)


def _attn2_param(key: str, where: Path) -> None:
    """Only attn2 projections may be in a concept: anything else is refused by name."""
    module, _, param = key.partition(".attn2.")
    if not module or param not in KV_PARAMS + Q_OUT_PARAMS:
        raise InputError(f"{where}: unexpected tensor {key!r} (a concept holds only attn2 "
                         f"{', '.join(KV_PARAMS + Q_OUT_PARAMS)})")


def _tensor(value, key: str, where: Path, ndim: int | None = None) -> torch.Tensor:
    """``value`` as a checked tensor: floating point, ``ndim`` axes (when given), finite;
    else exit 2 naming the file and the field."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor"
                         + (" (low-rank compressed deltas are not supported: save the full delta)"
                            if isinstance(value, dict) else ""))
    if not value.is_floating_point():
        raise InputError(f"{where}: {key!r} holds {str(value.dtype).replace('torch.', '')} values, not floats")
    if ndim is not None and value.ndim != ndim:
        raise InputError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {ndim} axes")
    if not torch.isfinite(value).all():
        raise InputError(f"{where}: {key!r} holds non-finite values (NaN or inf)")
    return value


def _weight(value, name: str, key: str, where: Path) -> torch.Tensor:
    """An attn2 tensor: a bias (to_out.0.bias) has one axis, a weight two."""
    return _tensor(value, key, where, 1 if name.endswith(".bias") else 2)


def _token_rows(name: str, value, where: Path) -> tuple[list[str], torch.Tensor]:
    t = _tensor(value, name, where)
    rows = t.reshape(1, -1) if t.ndim == 1 else t
    if rows.ndim != 2 or not rows.numel():
        raise InputError(f"{where}: embedding of {name!r} has shape {tuple(t.shape)}, expected (dim,) or (n, dim)")
    return [name] + [f"{name}_{i}" for i in range(1, len(rows))], rows


def _load_a(folder: Path, weights: Path) -> tuple[dict, list[tuple[list[str], torch.Tensor]]]:
    attn2 = {}
    for key, value in _read(weights).items():
        if isinstance(value, dict) and not value and key.endswith("attn1.processor"):
            continue  # diffusers saves {} for every attn1 processor
        prefix, dot, suffix = key.partition(".processor.")
        if not dot or suffix not in _A_SUFFIX:
            raise InputError(f"{weights}: unexpected key {key!r} (expected <processor>.to_k_custom_diffusion.weight, ...)")
        name = f"{prefix}.{_A_SUFFIX[suffix]}"
        _attn2_param(name, weights)
        attn2[name] = _weight(value, name, key, weights)
    concepts = []
    for f in sorted(folder.iterdir()):
        if f.name in WEIGHTS_A or f.suffix not in (".safetensors", ".bin"):
            continue
        data = _read(f)
        if not isinstance(data, dict) or list(data) != [f.stem]:
            raise InputError(f"{f}: a token embedding file must hold exactly its token {f.stem!r}, found "
                             f"{list(data) if isinstance(data, dict) else type(data).__name__}")
        concepts.append(_token_rows(f.stem, data[f.stem], f))
    if not concepts:
        raise InputError(f"{folder}: Custom Diffusion weights without a token embedding file (<token>.safetensors)")
    return attn2, concepts


def _load_b(path: Path) -> tuple[dict, list[tuple[list[str], torch.Tensor]]]:
    data = _read(path)
    if not isinstance(data, dict) or set(data) != {"unet", "modifier_token"}:
        raise InputError(f"{path}: expected a dict with keys 'unet' and 'modifier_token', "
                         f"found {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    if not isinstance(data["unet"], dict) or not isinstance(data["modifier_token"], dict):
        raise InputError(f"{path}: 'unet' and 'modifier_token' must be dicts of tensors")
    attn2 = {}
    for key, value in data["unet"].items():
        _attn2_param(key, path)
        attn2[key] = _weight(value, key, key, path)
    concepts = [_token_rows(name, value, path) for name, value in data["modifier_token"].items()]
    if not concepts:
        raise InputError(f"{path}: 'modifier_token' is empty")
    return attn2, concepts


def _load_c(path: Path, tokens: list[str] | None) -> tuple[dict, list[tuple[list[str], torch.Tensor]]]:
    data = _read(path)
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or "embed" not in state:
        raise InputError(f"{path}: expected {{'state_dict': {{..., 'embed': (n, dim)}}}} (Custom Diffusion's CompVis delta)")
    attn2 = {}
    for key, value in state.items():
        if key == "embed":
            continue
        if not key.startswith(_COMPVIS_PREFIX):
            raise InputError(f"{path}: unexpected key {key!r} (expected {_COMPVIS_PREFIX}<block>...attn2...)")
        try:
            name = compvis_to_diffusers(key[len(_COMPVIS_PREFIX):])
        except KeyError:
            raise InputError(f"{path}: {key!r} is not the cross-attention of an SD v1 transformer block") from None
        _attn2_param(name, path)
        attn2[name] = _weight(value, name, key, path)
    embed = _tensor(state["embed"], "embed", path)
    embed = embed.reshape(1, -1) if embed.ndim == 1 else embed
    if embed.ndim != 2:
        raise InputError(f"{path}: 'embed' has shape {tuple(embed.shape)}, expected (n, dim)")
    names = tokens or [f"<new{i}>" for i in range(1, len(embed) + 1)]
    if len(names) != len(embed):
        raise InputError(f"{path}: 'embed' has {len(embed)} rows but {CONCEPT_JSON} names {len(names)} tokens")
    # one row per modifier token: CompVis' multi-concept training (<new1>+<new2>) keeps them in one tensor
    return attn2, [([name], embed[i:i + 1]) for i, name in enumerate(names)]


def _load_t(path: Path) -> tuple[dict, list[tuple[list[str], torch.Tensor]]]:
    data = _read(path)
    if not isinstance(data, dict) or len(data) != 1:
        raise InputError(f"{path}: a textual inversion file holds one {{token: embedding}}, found "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    (name, value), = data.items()
    return {}, [_token_rows(name, value, path)]


@dataclass(frozen=True, eq=False)
class Concept:
    """One personalized item. ``attn2`` maps diffusers parameter names
    (``<block>.transformer_blocks.0.attn2.to_k.weight``, …) to tensors; ``embeddings``
    (n_tokens, dim) are the rows of ``tokens``; ``info`` is concept.json, if any."""

    name: str
    tokens: tuple[str, ...]
    embeddings: torch.Tensor
    attn2: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def prompt_token(self) -> str:
        """What goes before the class word in a prompt ("<new1>", or "tok tok_1" for a
        multi-vector textual inversion)."""
        return " ".join(self.tokens)

    @cached_property
    def digest(self) -> str:
        """sha256 of tokens and tensors: a concept's identity for caches and run fingerprints."""
        h = hashlib.sha256(json.dumps(self.tokens).encode())
        for key in sorted(self.attn2):
            h.update(key.encode())
            h.update(self.attn2[key].detach().float().cpu().contiguous().numpy().tobytes())
        h.update(self.embeddings.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def load_all(cls, folder: str | Path) -> list["Concept"]:
        """Every concept of ``folder``: one, or for a multi-concept Custom Diffusion folder
        (diffusers' ``--modifier_token "<new1>+<new2>"``: one weights file and one
        ``<token>.safetensors`` per token; ``delta.bin`` with several modifier tokens; a
        CompVis ``embed`` of several rows) one per token, sharing the K/V trained jointly.
        Every tensor is checked on load: floats, shapes, finite values."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: concept folder not found")
        info = _read_info(folder / CONCEPT_JSON)
        a = [folder / n for n in WEIGHTS_A if (folder / n).is_file()]
        c = sorted(folder.glob("delta*.ckpt"))
        t = [folder / n for n in EMBEDS_T if (folder / n).is_file()]
        if a:
            (attn2, found), source = _load_a(folder, a[0]), a[0].name
        elif (folder / DELTA_B).is_file():
            (attn2, found), source = _load_b(folder / DELTA_B), DELTA_B
        elif c:
            (attn2, found), source = _load_c(c[-1], info.get("tokens")), c[-1].name
        elif t:
            (attn2, found), source = _load_t(t[0]), t[0].name
        else:
            raise InputError(f"{folder}: no concept weights found (expected {WEIGHTS_A[0]} with <token>.safetensors, "
                             f"{DELTA_B}, delta*.ckpt, or {EMBEDS_T[0]})")
        tokens = [tok for names, _ in found for tok in names]
        if len(set(tokens)) != len(tokens):
            raise InputError(f"{folder}: token names repeat: {tokens}")
        if len(found) == 1:
            names, rows = found[0]
            return [cls(folder.name, tuple(names), rows, attn2, source, info)]
        return [cls(f"{folder.name}{TOKEN_SEPARATOR}{names[0]}", tuple(names), rows, attn2, source, info)
                for names, rows in found]

    @classmethod
    def load(cls, folder: str | Path, token: str | None = None) -> "Concept":
        """The concept of ``folder``; in a multi-concept folder the one of ``token`` (also
        written ``folder#token``, the command line's form)."""
        folder = Path(folder)
        if token is None and not folder.exists() and TOKEN_SEPARATOR in folder.name:
            name, _, token = folder.name.rpartition(TOKEN_SEPARATOR)
            folder = folder.with_name(name)
        concepts = cls.load_all(folder)
        if token is not None:
            hit = [c for c in concepts if c.tokens[0] == token]
            if not hit:
                raise InputError(f"{folder}: no concept with token {token!r} (it holds "
                                 f"{', '.join(c.tokens[0] for c in concepts)})")
            return hit[0]
        if len(concepts) > 1:
            tokens = [c.tokens[0] for c in concepts]
            raise InputError(f"{folder}: holds {len(concepts)} concepts trained together ({', '.join(tokens)}); "
                             f"choose one: {folder}{TOKEN_SEPARATOR}{tokens[0]}")
        return concepts[0]

    # -- checks and application ---------------------------------------------------------
    def check(self, sd) -> None:
        """Names, count and shapes against the model; the error names the offending key."""
        where = f"concept {self.name!r} ({self.source})"
        dim = sd.text_encoder.get_input_embeddings().weight.shape[1]
        if self.embeddings.shape[1] != dim:
            raise InputError(f"{where}: token embedding has dimension {self.embeddings.shape[1]}, "
                             f"the model's text encoder {dim}")
        if not self.attn2:
            return
        params = dict(sd.unet.named_parameters())
        modules = sorted(n for n, _ in sd.unet.named_modules() if n.endswith(".attn2"))
        for key, value in self.attn2.items():
            if key not in params:
                raise InputError(f"{where}: {key!r} is not a parameter of this UNet")
            if tuple(value.shape) != tuple(params[key].shape):
                raise InputError(f"{where}: {key!r} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(params[key].shape)}")
        has_q_out = any(k.endswith(Q_OUT_PARAMS) for k in self.attn2)
        needed = KV_PARAMS + (Q_OUT_PARAMS if has_q_out else ())
        for m in modules:
            for p in needed:
                if f"{m}.{p}" not in self.attn2:
                    raise InputError(f"{where}: missing {m}.{p} (a concept needs "
                                     f"{'K, V, Q and out' if has_q_out else 'K and V'} of all {len(modules)} "
                                     f"cross-attention blocks)")

    @contextmanager
    def applied(self, sd):
        """Within the block the model holds the concept: token ids added to the tokenizer
        (once; they stay), embedding rows and attn2 weights written; all restored bitwise
        on exit. Yields the token ids."""
        self.check(sd)
        ids = add_tokens(sd, self.tokens)
        table = sd.text_encoder.get_input_embeddings().weight
        params = dict(sd.unet.named_parameters())
        saved_rows = table.detach()[ids].clone()
        saved = {k: params[k].detach().clone() for k in self.attn2}
        try:
            with torch.no_grad():
                table[ids] = self.embeddings.to(table.device, table.dtype)
                for k, v in self.attn2.items():
                    params[k].copy_(v)
            yield ids
        finally:
            with torch.no_grad():
                table[ids] = saved_rows
                for k, v in saved.items():
                    params[k].copy_(v)


def add_tokens(sd, tokens) -> list[int]:
    """Ids of ``tokens``, adding the missing ones to the tokenizer and growing the
    embedding table to match (new rows are written by whoever applies a concept)."""
    new = [t for t in tokens if t not in sd.tokenizer.get_vocab()]
    if new:
        sd.tokenizer.add_tokens(new)
    table = sd.text_encoder.get_input_embeddings().weight
    if len(sd.tokenizer) > table.shape[0]:
        trainable = table.requires_grad
        sd.text_encoder.resize_token_embeddings(len(sd.tokenizer), mean_resizing=False)
        sd.text_encoder.get_input_embeddings().weight.requires_grad_(trainable)
    return sd.tokenizer.convert_tokens_to_ids(list(tokens))


def check_replaceable(folder: str | Path, what: str = "concept folder") -> None:
    """A concept is written by replacing its folder as a whole: the folder must be new,
    empty, or an earlier concept (it holds concept.json or concept weights); any other
    folder (photos, a home directory) is refused, never deleted."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(f"{what} {folder} is an existing file, not a folder")
    names = {p.name for p in folder.iterdir()}
    if names and not names & {CONCEPT_JSON, DELTA_B, *WEIGHTS_A, *EMBEDS_T}:
        raise InputError(f"{what} {folder} holds other files ({', '.join(sorted(names)[:3])}...) and is not a concept; "
                         "a concept folder is replaced as a whole, so give a new or empty folder")


def save_concept(folder: str | Path, tokens, embeddings: torch.Tensor, attn2: dict[str, torch.Tensor],
                 info: dict) -> Path:
    """Write format A (safetensors, the key names diffusers' ``save_attn_procs`` uses) plus
    one ``<token>.safetensors`` per token and concept.json. Everything is written to a
    staging folder beside ``folder`` and renamed into place: a concept appears whole or not
    at all; an existing ``folder`` is replaced."""
    from safetensors.torch import save_file

    folder = Path(folder)
    harm = guard.protected(folder)
    if harm:  # replacing the folder as a whole must never remove an input (text2mask.guard, rule 1)
        raise InputError(f"refusing to write the concept {folder}: {harm}")
    for token in tokens:
        safe_name(token, "concept token")
    check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    to_a = {v: k for k, v in _A_SUFFIX.items()}
    weights = {}
    for name, value in attn2.items():
        module, _, param = name.partition(".attn2.")
        weights[f"{module}.attn2.processor.{to_a[param]}"] = value.detach().float().cpu().contiguous()
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_file(weights, str(stage / WEIGHTS_A[0]), metadata={"format": "pt"})
        for token, row in zip(tokens, embeddings):
            save_file({token: row.detach().float().cpu().contiguous()}, str(stage / f"{token}.safetensors"),
                      metadata={"format": "pt"})
        write_json(stage / CONCEPT_JSON, {**info, "tokens": list(tokens)})
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(stage, folder)
            shutil.rmtree(old)
        else:
            os.replace(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder
