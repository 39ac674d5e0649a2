"""HTTP server: the OpenAI Images API, an AUTOMATIC1111 subset, a job API with live previews,
and a web page, all over the same Pipeline methods. Needs the `server` extra
(pip install 'nanodiffusion[server]')."""
from .params import Limits


def create_app(models_dir=None, device="cpu", api_key=None, limits=None):
    from .app import create_app as _create

    return _create(models_dir=models_dir, device=device, api_key=api_key, limits=limits)


def serve(models_dir=None, host="127.0.0.1", port=8000, api_key=None, device="cpu",
          limits=None, dtype="float32"):
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(models_dir=models_dir, device=device, api_key=api_key, limits=limits,
                     dtype=dtype)
    names = app.state.registry.names()
    print(f"nanodiffusion: serving {names or 'no models'} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["Limits", "create_app", "serve"]
