"""Region chat in the browser: ``python -m gpt4roi_sft.demo --model DIR [--adapter DIR]``.

A page of our own (``static/``: plain HTML, JavaScript and CSS, nothing fetched from elsewhere) over a
standard-library HTTP server (:mod:`gpt4roi_sft.demo.server`). The model code is
:mod:`gpt4roi_sft.infer`'s; the server adds request checking, one queue in front of the model, and
server-sent events for streamed answers.
"""

from gpt4roi_sft.demo.server import DemoApp, DemoSettings, GenerationQueue, make_server

__all__ = ["DemoApp", "DemoSettings", "GenerationQueue", "make_server"]
