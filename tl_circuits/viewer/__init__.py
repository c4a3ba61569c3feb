"""The interactive graph viewer's backend (issue 15): the viewer document
(:func:`~tl_circuits.viewer.data.viewer_document`), the self-contained HTML page
(:func:`~tl_circuits.viewer.html.self_contained_html`) and the local server
(:func:`~tl_circuits.viewer.server.make_server`, ``tl-circuits serve``). The page itself
(JS, CSS, ``index.html``) lives in ``assets/``."""

from tl_circuits.viewer.data import viewer_document
from tl_circuits.viewer.html import self_contained_html

__all__ = ["self_contained_html", "viewer_document"]
