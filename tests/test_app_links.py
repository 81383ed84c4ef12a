"""Links reproduce the view: every page widget round-trips through the query string, garbled values
fall back to defaults with one message, opening a link adds no history entry, Back restores a view.

The tiny random pair (6 blocks, 8x8 grid at 112 px) keeps each run well under a second.
"""
import sys

import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import APP, TINY, TINY_SIDE, register_tiny_models

sys.path.insert(0, str(APP))
import links  # noqa: E402  (the app's modules live in app/)

LINK = dict(model=TINY, weights="random", side=str(TINY_SIDE), images="astronaut,cat")


def _app(**params) -> AppTest:
    register_tiny_models()
    at = AppTest.from_file(str(APP / "main.py"), default_timeout=120)
    at.query_params.update(params)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_fields_read_what_they_write_and_refuse_the_rest():
    state = dict(head=3, opacity=0.35, post_norm=True, norm_scale_shared=False, extra_layers=[1, 4], focus_image="cat",
                 embed_method="umap", embed_normalize=True, layer=7, grid_cell=320, heads_query="reg2",
                 attention_patch=(0.3125, 0.5625))
    values, bad = links.read(links.write(state))
    assert values == state and bad == []
    hostile = dict(head="-1", opacity="nan", post_norm="yes", hist_layers="1,x", embed_method="tsne", embed_unit="9" * 5000,
                   image="x" * 10_000, layer="1e3", log_y="", format="svg", patch="nan,0.5")
    values, bad = links.read(hostile)
    assert values == {"figure_format": "svg"}
    assert bad == ["layer", "image", "head", "opacity", "post_norm", "hist_layers", "embed_method", "embed_unit", "patch"]
    assert links.read({"opacity": "0.33", "head": "mean"})[0] == {"opacity": 0.35, "head": "mean"}  # on the slider's steps


def test_a_link_reproduces_the_view_set_on_every_page():
    at = _app(**LINK).run()
    at.slider(key="layer").set_value(4).run()
    at.slider(key="opacity").set_value(0.3).run()
    at.toggle(key="norm_scale_shared").set_value(False).run()
    at.toggle(key="post_norm").set_value(True).run()
    at.selectbox(key="focus_image").set_value("cat").run()
    at.switch_page("views/attention.py").run()
    at.selectbox(key="head").set_value(1).run()
    at.toggle(key="shared_scale").set_value(True).run()
    at.switch_page("views/histogram.py").run()
    at.multiselect(key="extra_layers").set_value([1, 2]).run()
    at.toggle(key="log_y").set_value(False).run()
    at.switch_page("views/embedding.py").run()
    at.toggle(key="embed_normalize").set_value(True).run()
    _ok(at)

    teammate = _app(**at.query_params).run()  # a fresh session opens the link on the first page
    _ok(teammate)
    assert teammate.slider(key="layer").value == 4 and teammate.slider(key="opacity").value == 0.3
    assert not teammate.toggle(key="norm_scale_shared").value and teammate.toggle(key="post_norm").value
    assert teammate.selectbox(key="focus_image").value == "cat"
    teammate.switch_page("views/attention.py").run()
    assert teammate.selectbox(key="head").value == 1 and teammate.toggle(key="shared_scale").value
    teammate.switch_page("views/histogram.py").run()
    assert teammate.multiselect(key="extra_layers").value == [1, 2] and not teammate.toggle(key="log_y").value
    teammate.switch_page("views/embedding.py").run()
    _ok(teammate)
    assert teammate.toggle(key="embed_normalize").value
    assert dict(teammate.query_params) == dict(at.query_params)


def test_garbled_view_values_get_one_message_and_their_defaults():
    at = _app(**LINK, head="-1", opacity="nan", post_norm="yes", hist_layers="1,x", embed_unit="9" * 5000,
              image="../../etc/passwd", norm_scale_shared="2").run()
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning if "not understood" in w.value]
    assert "head, opacity, post_norm, norm_scale_shared, hist_layers and 1 more were" in warning
    assert at.slider(key="opacity").value == 0.6 and not at.toggle(key="post_norm").value
    assert at.toggle(key="norm_scale_shared").value and at.selectbox(key="focus_image").value == "astronaut"
    at.switch_page("views/attention.py").run()
    _ok(at)
    assert at.selectbox(key="head").value == "mean"
    assert at.query_params["head"] == "mean" and at.query_params["opacity"] == "0.6"  # the link is corrected


def test_opening_a_link_adds_no_history_entry_until_the_view_changes():
    """Each write of the query string is a browser history entry: the first run must not write one,
    or the first Back press lands on the same view."""
    at = _app(**LINK).run()
    _ok(at)
    assert dict(at.query_params) == LINK
    at.slider(key="opacity").set_value(0.3).run()
    assert at.query_params["opacity"] == "0.3" and at.query_params["layer"] == "4" and at.query_params["compare"] == "1"


def test_back_and_forward_bring_the_view_of_the_link_back(monkeypatch):
    import ui

    at = _app(**LINK).run()
    at.slider(key="opacity").set_value(0.3).run()
    at.slider(key="layer").set_value(2).run()
    earlier = dict(at.query_params)
    at.toggle(key="post_norm").set_value(True).run()
    at.slider(key="opacity").set_value(0.9).run()
    monkeypatch.setattr(ui, "_history_navigation", lambda: True)
    at.query_params = dict(earlier)
    at.run()
    _ok(at)
    assert at.slider(key="opacity").value == 0.3 and at.slider(key="layer").value == 2
    assert not at.toggle(key="post_norm").value and dict(at.query_params) == earlier
    at.query_params = dict(LINK)  # back to the link as opened: what it leaves out is at its default
    at.run()
    _ok(at)
    assert at.slider(key="opacity").value == 0.6 and at.slider(key="layer").value == 4


@pytest.mark.parametrize("bad", ["abc", "0.5", "-3"])
def test_a_bad_compare_or_side_keeps_the_sidebar_usable(bad):
    at = _app(**dict(LINK, compare=bad, side=bad)).run()
    assert not at.exception
    assert at.checkbox(key="compare").value and at.number_input(key="side").value >= 4 * 14


def test_a_link_opens_the_attention_heads_on_the_patch_it_names():
    at = _app(**LINK, layer="4", heads_query="patch", patch="0.4375,0.5625").run()
    at.switch_page("views/attention.py").run()
    _ok(at)
    assert at.selectbox(key="heads_query").value == "patch"
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("who attends to patch (3, 4)" in spec for spec in titles)


def test_a_page_waiting_on_a_job_hears_of_its_end_at_once():
    """The upload benchmark: a short capture is waited for without a 0.1 s polling step (or a progress bar)."""
    import time

    import jobs

    board = jobs.JobBoard()
    job = board.run("k", "short", lambda job: time.sleep(0.05) or 7)
    started = time.monotonic()
    assert job.wait(5.0) and time.monotonic() - started < 1.0 and board.result(job) == 7
    slow = board.run("slow", "slow", lambda job: time.sleep(0.5))
    assert not slow.wait(0.01)
