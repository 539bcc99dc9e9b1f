"""`esd`: the platform's command-line client (typer and rich), over the REST API alone.

`config.py` where the gateway, key and user come from; `api.py` the HTTP calls and the ESD
envelope; `uploads.py` multipart uploads straight to storage (parallel, resumable);
`events.py` Server-Sent Events; `main.py` the commands."""
