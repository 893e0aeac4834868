"""The HTTP server: a FastAPI app around a Predictor (`create_app`) and its web page (static/index.html)."""
