"""Every page opens for one tiny model of each family vitlens reads (AppTest, random weights).

The tiny models are registered with timm under names that keep their family's name parts
(``_dinov3``, ``_radio_``, ...), so the app treats them as it treats the real ones.
"""
from __future__ import annotations

import pytest
import timm
from streamlit.testing.v1 import AppTest
from timm.models import register_model

from app_fixtures import APP

pytestmark = pytest.mark.slow
PAGES = ["views/norm_maps.py", "views/histogram.py", "views/emergence.py", "views/attention.py",
         "views/embedding.py", "views/about.py"]
SIDE = 64  # grid 4x4 for the 16 px patches
FAMILIES = {  # registered name: (timm constructor, tiny arguments)
    "vitlens_test_small_patch16_dinov3": ("vit_small_patch16_dinov3", {}),
    "vitlens_test_eva02_patch16": ("eva02_tiny_patch14_224", {"patch_size": 16, "ref_feat_shape": (4, 4)}),
    "vitlens_test_pe_core_patch16": ("vit_pe_core_tiny_patch16_384", {"ref_feat_shape": (4, 4), "attn_pool_num_heads": 2}),
    "vitlens_test_siglip_patch16": ("vit_base_patch16_siglip_224", {}),
    "vitlens_test_aimv2_patch16": ("aimv2_large_patch14_224", {"patch_size": 16}),
    "vitlens_test_base_patch16_radio_v3": ("vit_base_patch16_radio_v3", {}),
}


def _register(name: str) -> None:
    if timm.is_model(name):
        return
    base, extra = FAMILIES[name]

    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": SIDE, **extra, **kwargs}
        return timm.create_model(base, pretrained=False, **args)

    build.__name__ = name
    register_model(build)


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_page_opens_for_each_family(name):
    _register(name)
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=180)
    at.query_params.update(model=name, weights="random", compare="0", side=str(SIDE), images="cat")
    at.run()
    _ok(at)
    for page in PAGES[1:]:
        at.switch_page(page).run()
        _ok(at)
        if page == "views/attention.py":
            _check_attention_page(name, at)


def _check_attention_page(name: str, at: AppTest) -> None:
    infos = " ".join(info.value for info in at.info)
    titles = " ".join(str(chart.proto.spec) for chart in at.get("plotly_chart"))
    if "siglip" in name or "pe_core" in name:
        assert "attention-pool query" in titles
    if "siglip" in name or "aimv2" in name:
        assert "no class token and no registers" in infos
    if "aimv2" in name:
        assert "no attention-pool head either" in infos and not at.get("plotly_chart")
    if "dinov3" in name or "radio" in name:
        assert "reg3" in titles
