"""faceflow's HTTP surface, shared by the deployed HTTP API (functions/api) and `faceflow serve`:
the request and response models, the Error shape and its exception handlers, the synchronous
photo routes and the OpenAPI document. Like the CLI it sits on top of the core package; the
core modules never import it. It needs the `serve` extra (Powertools and pydantic)."""
