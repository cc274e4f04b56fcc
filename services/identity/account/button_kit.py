"""The Connect with Loopwise button kit: the HTML and CSS an app pastes."""

from __future__ import annotations

from aiohttp import web

from services.identity import pages

BUTTON_HTML = (
    '<a class="lw-connect" href="https://YOUR-SCHOOL.loopwise.com/v1/oauth/authorize?...">\n'
    '  <span class="lw-connect-mark" aria-hidden="true"></span>Connect with Loopwise\n'
    "</a>"
)


def _button_css() -> str:
    """The kit's rules, cut from the stylesheet the page itself uses, so the two never differ."""
    css = (pages.STATIC_DIR / "connect.css").read_text(encoding="utf-8")
    start = css.index(".lw-connect {")
    return css[start : css.index(".snippet {")].strip()


async def button_kit(request: web.Request) -> web.StreamResponse:
    return pages.render(
        request,
        "button_kit.html",
        title="Connect with Loopwise button",
        html_snippet=BUTTON_HTML,
        css_snippet=_button_css(),
        authorize_path="/v1/oauth/authorize",
    )
