"""lfm-serve: the OpenAI-compatible HTTP door to a bundle (the optional [serve] extra: starlette, uvicorn).

    from lfm_edge.runtime.serve import ServeOptions, create_app
    app = create_app(model, ServeOptions(model_id="demo"))      # any ASGI server runs it; lfm-serve uses uvicorn

protocol.py: requests and responses in OpenAI's shapes; states.py: conversation states kept across stateless
requests; app.py: the routes, the generation slot and its queue, streaming.
"""

from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
