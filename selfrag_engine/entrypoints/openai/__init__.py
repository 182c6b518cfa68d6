"""The OpenAI-compatible HTTP server, split as vLLM splits its `openai/` package: `protocol` (the request
bodies), `serving_engine` (what every endpoint shares: submitting, waiting, usage), `streaming` (server-sent
events), `logprobs` (OpenAI's log-probability objects), one `serving_*` module per endpoint, `metrics`
(Prometheus) and `app` (the FastAPI app: routes, middleware, `serve`)."""
