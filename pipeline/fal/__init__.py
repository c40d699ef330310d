"""The fal client: the public run/fetch/batch API, transport, files, settings, key, errors, CLI."""
