"""fermi on Ray Serve: N runtimes as replicas behind one OpenAI-compatible endpoint, with
cache-aware routing (`fermi serve ray`, or `fermi.ray_serve.app:app_builder` in a Serve config).

Importing this package imports nothing of Ray; only fermi.ray_serve.app, .router and .run do."""
