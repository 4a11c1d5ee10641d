"""The cloud consumer deployment: Ray actors that drain, verify and process chunks."""
