"""Serving (`mythos_deploy.serving`): an OpenAI-compatible HTTP server and a Triton Inference
Server model repository, both thin adapters over the runtimes' batching engine. Nothing here
imports the exporters: a server host needs none."""
