"""Pathology foundation models by name: architecture, input, normalisation and readout, from each model's card.

A preset builds the published architecture without downloading anything; the user brings the
weights file (``nic-fast encoders import PRESET --weights FILE -o ENC.pt``). The settings are
the ones each model's card and its reference code use; TRIDENT's ``patch_encoder_models/load.py``
(https://github.com/mahmoodlab/TRIDENT) loads every one of these models with timm and is cited
where it is the clearest statement of a card's code. Magnification: the cards' 20× is
0.5 µm/px, and a preset's patches are read at its µm/px and size directly (TRIDENT reads
256 px at 20× and resizes to 224; nic-fast reads 224 px at 0.5 µm/px).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from nic_fast.encoders.conch import ConchImageTower
from nic_fast.encoders.resnet import ResNet50Trunk
from nic_fast.encoders.spec import EncoderError, EncoderSpec
from nic_fast.encoders.swin import CTransPath
from nic_fast.encoders.vit import ViTConfig, VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.constants.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # conch/open_clip_custom/constants.py
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

StateDict = Mapping[str, torch.Tensor]


def _as_is(state: StateDict) -> dict[str, torch.Tensor]:
    return {key: state[key] for key in state}


@dataclass(frozen=True)
class Preset:
    """One published patch encoder.

    ``ignore`` lists (as regular expressions) the keys the published file carries that this
    encoder does not use — a text tower, a classifier, ImageNet layers past the cut — so
    that every other key must match exactly. ``adapt`` maps the remaining published names
    onto the module's (identity for timm checkpoints).
    """

    name: str
    title: str  # the model and who published it
    architecture: str
    size_class: str  # ViT-S, ViT-B, ViT-L, ViT-H, ViT-g, Swin-T, CNN: rows of the benchmark
    build: Callable[[], nn.Module]
    input_px: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    code_size: int
    readout: str
    licence: str  # short; "gated": the card asks users to request access and accept its terms
    card: str
    weights_file: str
    ignore: tuple[str, ...] = ()
    adapt: Callable[[StateDict], dict[str, torch.Tensor]] = field(default=_as_is)

    def spec(self, description: str = "") -> EncoderSpec:
        return EncoderSpec(name=self.name, input_px=self.input_px, mpp=self.mpp, channels=3, mean=self.mean,
                           std=self.std, code_size=self.code_size, sha256="",
                           description=description or f"{self.title}: {self.architecture}, {self.readout}")

    def convert(self, state: StateDict) -> dict[str, torch.Tensor]:
        """The published ``state`` as the module's state dict (ignored keys dropped, names adapted)."""
        patterns = [re.compile(p) for p in self.ignore]
        kept = {key: state[key] for key in state if not any(p.fullmatch(key) for p in patterns)}
        return self.adapt(kept)


def _vit(config: ViTConfig) -> Callable[[], nn.Module]:
    """A builder whose config stays readable (``preset.build.args[0]``), for tests and tools."""
    return partial(VisionTransformer, config)


# -- HuggingFace transformers layouts (Phikon: ViTModel; Phikon-v2: Dinov2Model) -------------
# transformers' ViT and DINOv2 are the same pre-norm ViT as timm's, with q, k and v as three
# linear layers; mapping their names onto timm's avoids depending on transformers.
_HF_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _from_transformers(state: StateDict) -> dict[str, torch.Tensor]:
    """transformers' ViT/DINOv2 names → timm's; q, k, v concatenated (in that order) into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in state:
        if match := _HF_QKV.fullmatch(key):
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = state[key]
            continue
        for pattern, replacement in _HF_RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = state[key]
                break
        else:
            out[key] = state[key]  # left as published: reported as unexpected
    for (block, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # an incomplete triple cannot be fused: keep the published names so they are reported
            out.update({f"encoder.layer.{block}.attention.attention.{p}.{kind}": t for p, t in parts.items()})
    return out


def _conch_visual(state: StateDict) -> dict[str, torch.Tensor]:
    """CONCH's checkpoint holds the whole CoCa model: keep ``visual.*`` without the prefix."""
    return {key.removeprefix("visual."): state[key] for key in state}


_MAHMOOD_LICENCE = "CC-BY-NC-ND-4.0, gated"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # https://huggingface.co/MahmoodLab/UNI: timm "vit_large_patch16_224", img_size 224, patch_size 16,
    # init_values 1e-5, num_classes 0 (class token); ImageNet mean/std.
    Preset("uni", "UNI (Mahmood Lab)", "ViT-L/16", "ViT-L",
           _vit(ViTConfig(224, 16, 1024, 24, 16, init_values=1e-5)), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           1024, "class token", _MAHMOOD_LICENCE, "https://huggingface.co/MahmoodLab/UNI", "pytorch_model.bin"),
    # https://huggingface.co/MahmoodLab/UNI2-h: timm_kwargs patch_size 14, depth 24, num_heads 24,
    # init_values 1e-5, embed_dim 1536, mlp_ratio 2.66667*2, no_embed_class, SwiGLUPacked + SiLU,
    # reg_tokens 8 (class token); ImageNet mean/std.
    Preset("uni2-h", "UNI2-h (Mahmood Lab)", "ViT-H/14, SwiGLU, 8 registers", "ViT-H",
           _vit(ViTConfig(224, 14, 1536, 24, 24, mlp_ratio=2.66667 * 2, init_values=1e-5, swiglu=True,
                          reg_tokens=8, no_embed_class=True)), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           1536, "class token", _MAHMOOD_LICENCE, "https://huggingface.co/MahmoodLab/UNI2-h", "pytorch_model.bin"),
    # https://huggingface.co/paige-ai/Virchow: timm "vit_huge_patch14_224", mlp_layer SwiGLUPacked,
    # act_layer SiLU, mlp_ratio 5.3375, init_values 1e-5; embedding = concat(class token, mean of
    # the patch tokens) = 2560; ImageNet mean/std.
    Preset("virchow", "Virchow (Paige)", "ViT-H/14, SwiGLU", "ViT-H",
           _vit(ViTConfig(224, 14, 1280, 32, 16, mlp_ratio=5.3375, init_values=1e-5, swiglu=True,
                          readout="class+mean")), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           2560, "class token + mean patch token", "Apache-2.0, gated",
           "https://huggingface.co/paige-ai/Virchow", "pytorch_model.bin"),
    # https://huggingface.co/paige-ai/Virchow2: as Virchow with reg_tokens 4; the patch tokens
    # are output[:, 5:] (registers excluded from the mean).
    Preset("virchow2", "Virchow2 (Paige)", "ViT-H/14, SwiGLU, 4 registers", "ViT-H",
           _vit(ViTConfig(224, 14, 1280, 32, 16, mlp_ratio=5.3375, init_values=1e-5, swiglu=True, reg_tokens=4,
                          readout="class+mean")), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           2560, "class token + mean patch token", "CC-BY-NC-ND-4.0, gated",
           "https://huggingface.co/paige-ai/Virchow2", "pytorch_model.bin"),
    # https://huggingface.co/bioptimus/H-optimus-0: timm "vit_giant_patch14_reg4_dinov2" (embed 1536,
    # depth 40, 24 heads, SwiGLUPacked, 4 registers, no_embed_class), img_size 224, init_values 1e-5,
    # global_pool "token"; mean (0.707223, 0.578729, 0.703617), std (0.211883, 0.230117, 0.177517).
    Preset("h-optimus-0", "H-optimus-0 (Bioptimus)", "ViT-g/14, SwiGLU, 4 registers", "ViT-g",
           _vit(ViTConfig(224, 14, 1536, 40, 24, mlp_ratio=2.66667 * 2, init_values=1e-5, swiglu=True,
                          reg_tokens=4, no_embed_class=True)), 224, 0.5,
           (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 1536, "class token",
           "Apache-2.0, gated", "https://huggingface.co/bioptimus/H-optimus-0",
           "pytorch_model.bin"),
    # https://huggingface.co/bioptimus/H-optimus-1: the same architecture and normalisation.
    Preset("h-optimus-1", "H-optimus-1 (Bioptimus)", "ViT-g/14, SwiGLU, 4 registers", "ViT-g",
           _vit(ViTConfig(224, 14, 1536, 40, 24, mlp_ratio=2.66667 * 2, init_values=1e-5, swiglu=True,
                          reg_tokens=4, no_embed_class=True)), 224, 0.5,
           (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 1536, "class token",
           "non-commercial (card), gated", "https://huggingface.co/bioptimus/H-optimus-1",
           "pytorch_model.bin"),
    # https://huggingface.co/prov-gigapath/prov-gigapath (tile encoder): timm "vit_giant_patch14_dinov2"
    # (SwiGLUPacked + SiLU) with patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values
    # 1e-5, mlp_ratio 5.33334 (class token); ImageNet mean/std; demo/3_load_tile_encoder.py.
    Preset("prov-gigapath", "Prov-GigaPath tile encoder (Providence / Microsoft)", "ViT-g/16, SwiGLU", "ViT-g",
           _vit(ViTConfig(224, 16, 1536, 40, 24, mlp_ratio=5.33334, init_values=1e-5, swiglu=True)), 224, 0.5,
           IMAGENET_MEAN, IMAGENET_STD, 1536, "class token", "Apache-2.0, gated",
           "https://huggingface.co/prov-gigapath/prov-gigapath", "pytorch_model.bin"),
    # https://huggingface.co/owkin/phikon: transformers ViTModel (ViT-B/16, iBOT), embedding =
    # last_hidden_state[:, 0]; ImageNet mean/std; ViTConfig's layer_norm_eps 1e-12.
    Preset("phikon", "Phikon (Owkin)", "ViT-B/16", "ViT-B",
           _vit(ViTConfig(224, 16, 768, 12, 12, norm_eps=1e-12)), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           768, "class token", "Owkin non-commercial", "https://huggingface.co/owkin/phikon",
           "model.safetensors", ignore=(r"pooler\..*",), adapt=_from_transformers),
    # https://huggingface.co/owkin/phikon-v2: transformers Dinov2Model (ViT-L/16, LayerScale),
    # embedding = last_hidden_state[:, 0]; ImageNet mean/std; Dinov2Config's layer_norm_eps 1e-6.
    Preset("phikon-v2", "Phikon-v2 (Owkin)", "ViT-L/16", "ViT-L",
           _vit(ViTConfig(224, 16, 1024, 24, 16, init_values=1e-5)), 224, 0.5, IMAGENET_MEAN, IMAGENET_STD,
           1024, "class token", "Owkin non-commercial",
           "https://huggingface.co/owkin/phikon-v2", "model.safetensors",
           ignore=(r"embeddings\.mask_token", r"pooler\..*"), adapt=_from_transformers),
    # https://huggingface.co/MahmoodLab/CONCH, https://github.com/mahmoodlab/CONCH: conch_ViT-B-16.json
    # (image_size 448, patch_size 16, attentional pooler, embed_dim 512), OpenAI CLIP mean/std;
    # encode_image(proj_contrast=False, normalize=False) per the README ("suitable for linear probe
    # or ... multiple-instance learning"); TRIDENT reads 512 px at 20x, resized to 448.
    Preset("conch", "CONCH image tower (Mahmood Lab)", "ViT-B/16 + attentional pooler", "ViT-B",
           ConchImageTower, 448, 0.5, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 512, "attentional pool, no projection",
           _MAHMOOD_LICENCE, "https://huggingface.co/MahmoodLab/CONCH", "pytorch_model.bin",
           ignore=(r"text\..*", r"text_decoder\..*", r"logit_scale", r"visual\.attn_pool_caption\..*",
                   r"visual\.ln_caption\..*", r"visual\.proj_contrast"), adapt=_conch_visual),
    # https://github.com/Xiyue-Wang/TransPath: Swin-T + ConvStem on timm 0.5.4 (timm-ctp), head
    # removed, state_dict["model"]; ImageNet mean/std, 224 px; TRIDENT's README runs its
    # CTransPath (CHIEF weights) at 10x (1 µm/px). The file's relative-position indices and
    # attention masks are recomputed.
    Preset("ctranspath", "CTransPath (Wang et al.)", "Swin-T/4 + conv stem", "Swin-T",
           CTransPath, 224, 1.0, IMAGENET_MEAN, IMAGENET_STD, 768, "mean of the last stage's tokens",
           "GPL-3.0 (TransPath repo)", "https://github.com/Xiyue-Wang/TransPath", "ctranspath.pth",
           ignore=(r".*\.relative_position_index", r".*\.attn_mask")),
    # https://github.com/kaiko-ai/towards_large_pathology_fms (hubconf.py): timm
    # "vit_small_patch16_224", num_classes 0 (class token); README: mean = std = (0.5, 0.5, 0.5).
    Preset("kaiko-vits16", "Kaiko ViT-S/16 (kaiko.ai)", "ViT-S/16", "ViT-S",
           _vit(ViTConfig(224, 16, 384, 12, 6)), 224, 0.5, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 384, "class token",
           "Kaiko non-commercial", "https://github.com/kaiko-ai/towards_large_pathology_fms",
           "vits16.pth"),
    # https://github.com/lunit-io/benchmark-ssl-pathology (README): timm VisionTransformer(img_size
    # 224, patch_size 8 or 16, embed_dim 384, num_heads 6, num_classes 0), DINO weights; mean
    # (0.70322989, 0.53606487, 0.66096631), std (0.21716536, 0.26081574, 0.20723464) (kaiko-ai/eva,
    # backbones/pathology/lunit.py, quoting Lunit).
    Preset("lunit-vits8", "Lunit DINO ViT-S/8", "ViT-S/8", "ViT-S",
           _vit(ViTConfig(224, 8, 384, 12, 6)), 224, 0.5, (0.70322989, 0.53606487, 0.66096631),
           (0.21716536, 0.26081574, 0.20723464), 384, "class token", "Lunit non-commercial",
           "https://github.com/lunit-io/benchmark-ssl-pathology", "dino_vit_small_patch8_ep200.torch"),
    Preset("lunit-vits16", "Lunit DINO ViT-S/16", "ViT-S/16", "ViT-S",
           _vit(ViTConfig(224, 16, 384, 12, 6)), 224, 0.5, (0.70322989, 0.53606487, 0.66096631),
           (0.21716536, 0.26081574, 0.20723464), 384, "class token", "Lunit non-commercial",
           "https://github.com/lunit-io/benchmark-ssl-pathology", "dino_vit_small_patch16_ep200.torch"),
    # CLAM (https://github.com/mahmoodlab/CLAM, models/resnet_custom.py) and TRIDENT's "resnet50"
    # (timm resnet50.tv_in1k, out_indices [3], AdaptiveAvgPool2d): ImageNet ResNet-50 to layer3, pooled.
    Preset("resnet50-trunc", "ResNet-50 to layer3, ImageNet (CLAM / TRIDENT baseline)", "ResNet-50 (layer1-3)",
           "CNN", ResNet50Trunk, 224, 0.5, IMAGENET_MEAN, IMAGENET_STD, 1024, "global mean of layer3",
           "BSD-3-Clause", "https://huggingface.co/timm/resnet50.tv_in1k", "model.safetensors",
           ignore=(r"layer4\..*", r"fc\.(weight|bias)")),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; the error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise EncoderError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} "
                           "(`nic-fast encoders presets` lists them)") from None


def build_on_meta(preset: Preset) -> nn.Module:
    """The architecture without memory: shapes and parameter counts, nothing allocated."""
    with torch.device("meta"):
        return preset.build()


def parameter_count(preset: Preset) -> int:
    return sum(p.numel() for p in build_on_meta(preset).parameters())
