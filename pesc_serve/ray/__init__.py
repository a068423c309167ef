"""pesc-serve on Ray Serve: engine replicas behind one OpenAI endpoint, routed by model.

``python -m pesc_serve.ray`` (cli.py) deploys the application app.py builds: an HTTP ingress
(ingress.py) in front of N engine replicas (replica.py), each one pesc-serve engine with the
single server's FastAPI app.  Only this package imports Ray; pesc_serve.server and
pesc_serve.engine know nothing of it.
"""
