"""Foundation-model presets: every architecture on the meta device, and each one against the code it is published for.

The reference checks build the cards' own constructors — timm's ``create_model`` with the
kwargs each card passes, timm-ctp's Swin for CTransPath, CONCH's pooler as its repository
writes it — and require the same parameter names and shapes (at full size, on the meta
device) and the same outputs (on small random instances). timm's package imports torchvision
for its data transforms, which cannot be installed beside the CPU torch wheel; its model code
never calls it, so a stand-in module satisfies those imports here, and only here.
"""
from __future__ import annotations

import dataclasses
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from nic_fast.encoders.presets import PRESETS, Preset, build_on_meta, get_preset, parameter_count
from nic_fast.encoders.spec import EncoderError
from nic_fast.encoders.vit import ViTConfig, VisionTransformer

VIT_PRESETS = [name for name, p in PRESETS.items() if isinstance(getattr(p.build, "args", [None])[0], ViTConfig)]


def _vit_config(preset: Preset) -> ViTConfig:
    return preset.build.args[0]  # type: ignore[attr-defined]


# -- every preset --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_architecture_on_meta_gives_the_code_size(name: str) -> None:
    preset = PRESETS[name]
    module = build_on_meta(preset).to("meta").eval()
    with torch.no_grad():
        out = module(torch.empty(2, 3, preset.input_px, preset.input_px, device="meta"))
    assert tuple(out.shape) == (2, preset.code_size)
    spec = preset.spec()
    assert (spec.code_size, spec.input_px, spec.mpp) == (preset.code_size, preset.input_px, preset.mpp)
    assert preset.card.startswith("https://") and preset.licence and preset.weights_file


def test_parameter_counts_match_the_published_sizes() -> None:
    """The cards' parameter counts (millions), to the precision they state them."""
    published = {"uni": 303, "uni2-h": 681, "virchow": 631, "virchow2": 631, "h-optimus-0": 1135,
                 "prov-gigapath": 1135, "phikon": 86, "phikon-v2": 303, "ctranspath": 28, "kaiko-vits16": 22}
    for name, millions in published.items():
        assert abs(parameter_count(PRESETS[name]) / 1e6 - millions) < 0.5 + 0.01 * millions, name


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(EncoderError, match=r"unknown preset 'uni3'; known: uni, uni2-h, .*resnet50-trunc"):
        get_preset("uni3")


# -- against the published code ----------------------------------------------------------------


class _Anything(type):
    """Any attribute is another class: enough for timm's import-time use of torchvision names."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args: object, **kwargs: object) -> type:
        return cls


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


@pytest.fixture(scope="module")
def torchvision_stand_in() -> Iterator[None]:
    """A torchvision for timm's imports only (``torchvision.ops.misc``, ``transforms``, ``datasets``)."""
    try:
        import torchvision  # noqa: F401

        yield
        return
    except ImportError:
        pass
    with pytest.MonkeyPatch.context() as patch:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                     "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets"):
            module = _StandInModule(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.__path__ = []
            patch.setitem(sys.modules, name, module)
        yield


@pytest.fixture(scope="module")
def timm(torchvision_stand_in: None) -> types.ModuleType:
    return pytest.importorskip("timm", reason="timm is the reference (make install adds it)")


def _timm_reference(timm: types.ModuleType, name: str, **overrides: object) -> tuple[nn.Module, object]:
    """timm's model for a preset, with the kwargs its card (as TRIDENT runs it) passes, and its readout."""
    swiglu = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}
    cls_token = lambda out: out  # noqa: E731 - timm's global_pool="token" already returns the class token
    table = {
        "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                              dynamic_img_size=True), cls_token),
        "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                                 embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                                                 no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **swiglu),
                   cls_token),
        "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                                 global_pool="", dynamic_img_size=True, **swiglu),
                    lambda out: torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1)),
        "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                                  mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **swiglu),
                     lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)),
        "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                              init_values=1e-5, dynamic_img_size=False), cls_token),
        "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                              init_values=1e-5, dynamic_img_size=False), cls_token),
        "prov-gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                           depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                                                           num_classes=0), cls_token),
        "kaiko-vits16": ("vit_small_patch16_224", dict(num_classes=0, dynamic_img_size=True), cls_token),
        "lunit-vits8": ("vit_small_patch8_224", dict(img_size=224, patch_size=8, embed_dim=384, num_heads=6,
                                                     num_classes=0), cls_token),
        "lunit-vits16": ("vit_small_patch16_224", dict(img_size=224, patch_size=16, embed_dim=384, num_heads=6,
                                                       num_classes=0), cls_token),
        # Phikon's ViT-B/16 as timm's: the same layout once transformers' names are mapped
        "phikon": ("vit_base_patch16_224", dict(num_classes=0), cls_token),
        "phikon-v2": ("vit_large_patch16_224", dict(num_classes=0, init_values=1e-5), cls_token),
    }
    model_name, kwargs, readout = table[name]
    return timm.create_model(model_name, pretrained=False, **{**kwargs, **overrides}), readout


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_vit_layout_is_timms_at_full_size(timm: types.ModuleType, name: str) -> None:
    if name == "conch":
        pytest.skip("CONCH's tower is checked as a whole below")
    with torch.device("meta"):
        reference, _ = _timm_reference(timm, name)
    ours = build_on_meta(PRESETS[name])
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values everywhere (LayerScale gammas and BN statistics included), so no term can hide."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if not t.is_floating_point() or key.endswith("attn_mask"):  # integers and Swin's fixed masks as they are
            out[key] = t
        elif "running_var" in key:
            out[key] = torch.rand(t.shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(t.shape, generator=generator) * 0.1
    return out


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "prov-gigapath",
                                  "kaiko-vits16", "phikon"])
def test_vit_outputs_equal_timms(timm: types.ModuleType, name: str) -> None:
    """Same arithmetic: each architecture cut to 2 blocks and a few patches, random weights, same output."""
    config = _vit_config(PRESETS[name])
    small = dataclasses.replace(config, depth=2, img_size=2 * config.patch_size)
    overrides: dict[str, object] = {"depth": 2, "img_size": small.img_size}
    reference, readout = _timm_reference(timm, name, **overrides)
    if name == "phikon":  # transformers' ViT uses 1e-12; timm's is 1e-6 unless told
        small = dataclasses.replace(small, norm_eps=1e-6)
    ours = VisionTransformer(small)
    state = _randomise(reference.state_dict(), seed=1)
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(2, 3, small.img_size, small.img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = readout(reference.eval()(x))
        got = ours.eval()(x)
    assert got.shape == (2, small.output_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _ConchAttentionalPooler(nn.Module):
    """conch/open_clip_custom/transformer.py's AttentionalPooler, as written there (sequence-first)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, x.shape[1], 1), x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


def test_conch_tower_equals_conchs_code(timm: types.ModuleType) -> None:
    """CONCH's VisualModel.forward_no_head: timm trunk's forward_features → pooler[:, 0] → ln_contrast."""
    from nic_fast.encoders.conch import ConchImageTower, TRUNK

    trunk_kwargs = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0,
                        dynamic_img_size=True)  # coca_model._build_vision_tower with conch_ViT-B-16.json
    with torch.device("meta"):
        full = nn.Module()
        full.trunk = timm.models.vision_transformer.VisionTransformer(**trunk_kwargs)
        full.attn_pool_contrast = _ConchAttentionalPooler(512, 768, n_head=8, n_queries=1)
        full.ln_contrast = nn.LayerNorm(512)
    ours_full = build_on_meta(PRESETS["conch"])
    assert {k: tuple(v.shape) for k, v in ours_full.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in full.state_dict().items()}

    reference = nn.Module()
    reference.trunk = timm.models.vision_transformer.VisionTransformer(**{**trunk_kwargs, "depth": 2, "img_size": 32})
    reference.attn_pool_contrast = _ConchAttentionalPooler(512, 768, n_head=8, n_queries=1)
    reference.ln_contrast = nn.LayerNorm(512)
    ours = ConchImageTower(dataclasses.replace(TRUNK, depth=2, img_size=32))
    state = _randomise(reference.state_dict(), seed=3)
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    reference.eval()
    with torch.no_grad():
        pooled = reference.attn_pool_contrast(reference.trunk.forward_features(x))[:, 0]
        torch.testing.assert_close(ours.eval()(x), reference.ln_contrast(pooled), rtol=1e-5, atol=1e-5)


def test_resnet_trunk_equals_timms_layer3_pooled(timm: types.ModuleType) -> None:
    """TRIDENT's resnet50: timm resnet50, features_only, out_indices [3], AdaptiveAvgPool2d(1)."""
    reference = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3], num_classes=0)
    ours = build_on_meta(PRESETS["resnet50-trunc"])
    ours_keys = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_keys == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    state = _randomise(reference.state_dict(), seed=5)
    reference.load_state_dict(state)
    ours = PRESETS["resnet50-trunc"].build()
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = nn.AdaptiveAvgPool2d(1)(reference.eval()(x)[0]).flatten(1)
        torch.testing.assert_close(ours.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_ctranspath_equals_timm_ctp(torchvision_stand_in: None) -> None:
    """TransPath's ctran.py: timm-ctp's swin_tiny_patch4_window7_224 with ConvStem, head removed."""
    timm_ctp = pytest.importorskip("timm_ctp", reason="timm-ctp is CTransPath's reference (make install adds it)")
    from timm_ctp.models.layers.helpers import to_2tuple

    class ConvStem(nn.Module):  # TransPath's ctran.py
        def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
            super().__init__()
            img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
            self.img_size, self.patch_size = img_size, patch_size
            self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            stem, input_dim, output_dim = [], 3, embed_dim // 8
            for _ in range(2):
                stem += [nn.Conv2d(input_dim, output_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(output_dim),
                         nn.ReLU(inplace=True)]
                input_dim, output_dim = output_dim, output_dim * 2
            stem.append(nn.Conv2d(input_dim, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*stem)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    with warnings.catch_warnings():  # timm 0.5.4 predates meshgrid's indexing argument
        warnings.simplefilter("ignore", UserWarning)
        reference = timm_ctp.create_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, pretrained=False)
    reference.head = nn.Identity()
    published = _randomise(reference.state_dict(), seed=7)
    reference.load_state_dict(published)
    preset = PRESETS["ctranspath"]
    ours = preset.build()
    ours.load_state_dict(preset.convert(published))  # the file's index and mask buffers are recomputed
    for key, value in published.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            torch.testing.assert_close(ours.get_buffer(key), value)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


class _ClassAndMean(nn.Module):
    """The README's example readout: class token and mean patch token of a timm ViT."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:].mean(dim=1)], dim=-1)


def test_a_timm_model_the_user_trained_saves_as_an_encoder(timm: types.ModuleType, tmp_path) -> None:
    """The README's worked example: wrap a timm ViT, save_encoder it, load it back, same output."""
    from nic_fast.encoders import EncoderSpec, load_encoder, save_encoder

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=64, depth=2).eval()
    module = _ClassAndMean(vit)
    spec = EncoderSpec(name="my-vits16", input_px=64, mpp=0.5, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       code_size=768, sha256="", description="DINO ViT-S/16 trained on our cohort")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = module(x)
    for suffix in (".pt", ".pt2"):
        encoder = load_encoder(save_encoder(module, spec, tmp_path / f"my-vits16{suffix}"))
        assert encoder.spec.sha256 and encoder.spec.code_size == 768
        torch.testing.assert_close(encoder(x), expected, rtol=1e-4, atol=1e-4)
