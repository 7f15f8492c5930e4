"""The prediction API and its web page (``carflow serve``): FastAPI on uvicorn.

Imports only :mod:`models` and the core package, never tasks or flows: the predictors it
runs are the ones the pipeline runs. Nothing is loaded at import time.
"""
