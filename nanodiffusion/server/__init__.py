"""HTTP server: the OpenAI Images API, an AUTOMATIC1111 subset, a job API with live previews,
and a web page, all over the same Pipeline methods. Needs the `server` extra
(pip install 'nanodiffusion[server]'): `create_app` and `serve` import it when first used."""
from .params import Limits


def serve(models_dir=None, host="127.0.0.1", port=8000, api_key=None, device="cpu",
          limits=None, dtype="float32", prediction_type=None, vae=None, low_memory=False):
    """Run the server until interrupted."""
    import uvicorn

    from .app import create_app

    app = create_app(models_dir=models_dir, device=device, api_key=api_key, limits=limits,
                     dtype=dtype, prediction_type=prediction_type, vae=vae,
                     low_memory=low_memory)
    names = app.state.registry.names()
    print(f"nanodiffusion: serving {names or 'no models'} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


def __getattr__(name):
    """`create_app` is app.create_app itself, imported (with FastAPI) on first use."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Limits", "create_app", "serve"]
